//! The native WebSocket protocol (seed 001), end to end over real sockets.

mod common;

use std::time::Duration;

use common::*;
use futures_util::SinkExt;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

#[tokio::test]
async fn seed_flow_subscribe_and_receive_envelope() {
    let gw = Gateway::default().await;
    let mut c =
        Client::connect(&gw.ws(&format!("token={}&company_id=acme", token("acme", &[])))).await;
    let hello = c.recv().await;
    assert_eq!(hello["type"], "connection.established");
    assert_eq!(hello["data"]["user_id"], "user-1");
    assert!(
        hello["data"]["server_time"]
            .as_str()
            .unwrap()
            .ends_with('Z')
    );

    let confirmed = c
        .subscribe(&["deal.stage.*", "timeline.object.created"])
        .await;
    assert_eq!(
        confirmed["data"]["topics"],
        json!(["deal.stage.*", "timeline.object.created"])
    );
    assert!(confirmed["data"]["timestamp"].is_string());

    let (status, body) = publish(
        &gw,
        &token("acme", &["publish"]),
        json!({
            "event_type": "deal.stage.updated",
            "data": {"deal_id": 456, "new_stage": "qualification"},
            "company_id": "acme",
            "region": "us-east-1",
            "idempotency_key": "deal-456-1",
            "gdpr_context": {"consent": true, "retention_days": 365},
        }),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let msg = c.recv().await;
    assert_eq!(msg["type"], "event");
    let e = &msg["data"];
    assert_eq!(e["event_id"], body["event_id"]);
    assert_eq!(e["event_type"], "deal.stage.updated");
    assert_eq!(e["data"]["deal_id"], 456);
    assert_eq!(e["metadata"]["region"], "us-east-1");
    assert_eq!(e["metadata"]["idempotency_key"], "deal-456-1");
    assert_eq!(e["metadata"]["gdpr_context"]["retention_days"], 365);
    assert!(e["timestamp"].as_str().unwrap().ends_with('Z'));
}

#[tokio::test]
async fn bearer_header_authenticates_too() {
    let gw = Gateway::default().await;
    let mut req = gw.ws("").into_client_request().unwrap();
    req.headers_mut().insert(
        "Authorization",
        format!("Bearer {}", token("acme", &[])).parse().unwrap(),
    );
    let (ws, _) = tokio_tungstenite::connect_async(req).await.unwrap();
    let mut c = Client { ws };
    assert_eq!(c.recv().await["type"], "connection.established");
}

#[tokio::test]
async fn bad_missing_or_mismatched_tokens_close_4001() {
    let gw = Gateway::default().await;
    let expired = sign(&json!({"tenant": "acme", "sub": "u", "exp": 1_000_000}));
    let wrong_key = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"tenant": "acme", "exp": 9_999_999_999u64}),
        &jsonwebtoken::EncodingKey::from_secret(b"another-secret"),
    )
    .unwrap();
    let no_tenant = sign(&json!({"sub": "u", "exp": 9_999_999_999u64}));
    let cases = [
        String::new(),
        "token=".to_owned(),
        "token=not.a.jwt".to_owned(),
        format!("token={expired}"),
        format!("token={wrong_key}"),
        format!("token={no_tenant}"),
        format!("token={}&company_id=globex", token("acme", &[])),
    ];
    for q in cases {
        let mut c = Client::connect(&gw.ws(&q)).await;
        let (code, _) = c.closed().await;
        assert_eq!(code, 4001, "query {q}");
    }
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"switchboard_websocket_rejected_total{reason="unauthorized"}"#
        ),
        7.0
    );
}

#[tokio::test]
async fn absurd_expiry_claims_do_not_break_the_connection() {
    let gw = Gateway::default().await;
    let t = sign(&json!({"tenant": "acme", "sub": "u", "exp": u64::MAX}));
    let mut c = Client::connect(&gw.ws(&format!("token={t}"))).await;
    c.recv_type("connection.established").await;
    c.send(json!({"type": "ping"})).await;
    assert_eq!(c.recv().await["type"], "pong");
}

#[tokio::test]
async fn company_id_claim_is_the_tenant_fallback() {
    let gw = Gateway::default().await;
    let t = sign(&json!({"company_id": 123, "user_id": 9, "exp": 9_999_999_999u64}));
    let mut c = Client::connect(&gw.ws(&format!("token={t}&company_id=123"))).await;
    let hello = c.recv().await;
    assert_eq!(hello["data"]["user_id"], "9");
    c.subscribe(&["deal.*"]).await;
    publish_ok(&gw, "123", "deal.x", json!({})).await;
    assert_eq!(c.events(1).await[0]["event_type"], "deal.x");
}

#[tokio::test]
async fn wildcards_follow_the_seed_and_overlaps_deliver_once_in_order() {
    let gw = Gateway::default().await;
    let mut c = Client::open(&gw, "acme").await;
    c.subscribe(&[
        "activity.*",
        "deal.*.updated",
        "deal.stage.updated",
        "deal.>",
    ])
    .await;
    let mut other = Client::open(&gw, "acme").await;
    other.subscribe(&["deal.*.updated"]).await;
    let topics = [
        "activity.task.completed", // activity.*
        "deal.stage.updated",      // three patterns overlap
        "deal.stage.x.updated",    // only deal.>
        "contact.email.sent",      // nothing
        "deal.owner.updated",
    ];
    let mut sent = Vec::new();
    for t in topics {
        sent.push(publish_ok(&gw, "acme", t, json!({"t": t})).await);
    }
    let got = c.events(4).await;
    assert_eq!(
        got.iter()
            .map(|e| e["event_type"].as_str().unwrap())
            .collect::<Vec<_>>(),
        [
            "activity.task.completed",
            "deal.stage.updated",
            "deal.stage.x.updated",
            "deal.owner.updated"
        ]
    );
    let got = other.events(2).await;
    assert_eq!(
        got.iter()
            .map(|e| e["event_type"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["deal.stage.updated", "deal.owner.updated"]
    );
    // A marker proves nothing else (no duplicate) was queued before it.
    publish_ok(&gw, "acme", "activity.marker.done", json!({})).await;
    assert_eq!(c.events(1).await[0]["event_type"], "activity.marker.done");
}

#[tokio::test]
async fn publish_order_is_kept_per_topic_under_load() {
    let gw = Gateway::default().await;
    let mut c = Client::open(&gw, "acme").await;
    c.subscribe(&["load.*"]).await;
    let publisher = {
        let url = gw.http();
        let t = token("acme", &["publish"]);
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            for i in 0..200 {
                let topic = if i % 2 == 0 { "load.a" } else { "load.b" };
                let r = http
                    .post(format!("{url}/api/realtime/publish/"))
                    .bearer_auth(&t)
                    .json(&json!({"event_type": topic, "data": {"i": i}}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
            }
        })
    };
    let got = c.events(200).await;
    publisher.await.unwrap();
    let is: Vec<i64> = got
        .iter()
        .map(|e| e["data"]["i"].as_i64().unwrap())
        .collect();
    assert_eq!(is, (0..200).collect::<Vec<_>>());
}

#[tokio::test]
async fn bad_input_gets_errors_and_the_connection_survives() {
    let gw = Gateway::default().await;
    let mut c = Client::open(&gw, "acme").await;
    c.send_raw(Message::Text("{not json".into())).await;
    let e = c.recv().await;
    assert_eq!(
        (e["type"].as_str(), e["data"]["code"].as_str()),
        (Some("error"), Some("malformed_message"))
    );
    c.send(json!({"type": "explode"})).await;
    assert_eq!(c.recv().await["data"]["code"], "unknown_message_type");
    c.send(json!({"type": "subscribe"})).await;
    assert_eq!(c.recv().await["data"]["code"], "invalid_topic");
    c.send(json!({"type": "subscribe", "topics": "deal.*"}))
        .await;
    assert_eq!(c.recv().await["data"]["code"], "malformed_message");
    c.send_raw(Message::Binary(vec![1, 2, 3].into())).await;
    assert_eq!(c.recv().await["data"]["code"], "binary_not_supported");
    c.send(json!({"type": "subscribe", "topics": ["deal..x", "a.>.b", "ok.*", "bad topic"]}))
        .await;
    let mut codes = Vec::new();
    for _ in 0..3 {
        let m = c.recv().await;
        assert_eq!(m["type"], "error", "{m}");
        codes.push(m["data"]["code"].as_str().unwrap().to_owned());
        assert!(
            m["data"]["message"]
                .as_str()
                .unwrap()
                .contains("invalid topic")
        );
    }
    assert_eq!(codes, ["invalid_topic"; 3]);
    let ok = c.recv().await;
    assert_eq!(ok["data"]["topics"], json!(["ok.*"]));
    c.send(json!({"type": "cursor.update", "cursor": 17})).await;
    assert_eq!(c.recv().await["data"]["code"], "malformed_message");
    c.send(json!({"type": "ping"})).await;
    assert_eq!(c.recv().await["type"], "pong");
    publish_ok(&gw, "acme", "ok.still", json!({})).await;
    assert_eq!(c.events(1).await[0]["event_type"], "ok.still");
}

#[tokio::test]
async fn seed_004_channel_form_echoes_request_id() {
    let gw = Gateway::default().await;
    let mut c = Client::open(&gw, "acme").await;
    c.send(json!({"type": "subscribe", "channel": "entity:Task", "requestId": "req_123", "timestamp": 1})).await;
    let m = c.recv().await;
    assert_eq!(m["type"], "subscribed");
    assert_eq!(m["channel"], "entity:Task");
    assert_eq!(m["requestId"], "req_123");
    publish_ok(&gw, "acme", "entity:Task", json!({"id": 1})).await;
    // A connection that subscribed in seed 004's form receives that form;
    // with no message type named by the publisher, `type` is "event".
    let m = c.recv().await;
    assert_eq!(
        (&m["type"], &m["channel"], &m["payload"]),
        (&json!("event"), &json!("entity:Task"), &json!({"id": 1})),
        "{m}"
    );
    assert!(
        m["timestamp"].as_u64().is_some() && m["cursor"].is_string(),
        "{m}"
    );
    c.send(json!({"type": "ping", "requestId": 7})).await;
    let pong = c.recv().await;
    assert_eq!(
        (pong["type"].as_str(), pong["requestId"].as_i64()),
        (Some("pong"), Some(7))
    );
    c.send(json!({"type": "unsubscribe", "channel": "entity:Task", "requestId": "req_124"}))
        .await;
    let m = c.recv().await;
    assert_eq!(
        (m["type"].as_str(), m["requestId"].as_str()),
        (Some("unsubscribed"), Some("req_124"))
    );
    publish_ok(&gw, "acme", "entity:Task", json!({"id": 2})).await;
    c.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let gw = Gateway::default().await;
    let mut c = Client::open(&gw, "acme").await;
    c.subscribe(&["a.*", "b.*"]).await;
    c.send(json!({"type": "unsubscribe", "topics": ["a.*"]}))
        .await;
    let m = c.recv().await;
    assert_eq!(m["type"], "unsubscription.confirmed");
    assert_eq!(m["data"]["topics"], json!(["a.*"]));
    publish_ok(&gw, "acme", "a.x", json!({})).await;
    publish_ok(&gw, "acme", "b.x", json!({})).await;
    assert_eq!(c.events(1).await[0]["event_type"], "b.x");
}

#[tokio::test]
async fn subscription_limit_is_enforced_with_an_error() {
    let mut cfg = config();
    cfg.limits.max_subscriptions_per_connection = 2;
    let gw = Gateway::start(cfg).await;
    let mut c = Client::open(&gw, "acme").await;
    c.send(json!({"type": "subscribe", "topics": ["a", "b", "c"]}))
        .await;
    let e = c.recv().await;
    assert_eq!(e["data"]["code"], "too_many_subscriptions");
    let ok = c.recv().await;
    assert_eq!(ok["data"]["topics"], json!(["a", "b"]));
}

#[tokio::test]
async fn oversized_frames_close_1009() {
    let mut cfg = config();
    cfg.limits.max_message_bytes = 4096;
    let gw = Gateway::start(cfg).await;
    let mut c = Client::open(&gw, "acme").await;
    let big = "x".repeat(10_000);
    c.send(json!({"type": "ping", "pad": big})).await;
    assert_eq!(c.closed().await.0, 1009);
    // Others are unaffected.
    let mut d = Client::open(&gw, "acme").await;
    d.send(json!({"type": "ping"})).await;
    assert_eq!(d.recv().await["type"], "pong");
}

#[tokio::test]
async fn floods_are_rate_limited_with_4029() {
    let mut cfg = config();
    cfg.limits.messages_per_minute = 120; // burst of 12
    let gw = Gateway::start(cfg).await;
    let mut c = Client::open(&gw, "acme").await;
    for _ in 0..50 {
        if c.ws
            .send(Message::Text(json!({"type": "ping"}).to_string().into()))
            .await
            .is_err()
        {
            break;
        }
    }
    let mut pongs = 0;
    let code = loop {
        match tokio::time::timeout(DEADLINE, futures_util::StreamExt::next(&mut c.ws))
            .await
            .unwrap()
        {
            Some(Ok(Message::Text(_))) => pongs += 1,
            Some(Ok(Message::Close(Some(f)))) => break u16::from(f.code),
            other => panic!("{other:?}"),
        }
    };
    assert_eq!(code, 4029);
    assert!((10..=13).contains(&pongs), "burst allowed {pongs} pongs");
}

#[tokio::test]
async fn origins_are_checked_on_upgrade() {
    let mut cfg = config();
    cfg.allowed_origins = vec!["http://app.example".into()];
    let gw = Gateway::start(cfg).await;
    let url = gw.ws(&format!("token={}", token("acme", &[])));
    let mut req = url.clone().into_client_request().unwrap();
    req.headers_mut()
        .insert("Origin", "http://evil.example".parse().unwrap());
    let err = tokio_tungstenite::connect_async(req).await.unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    let mut req = url.clone().into_client_request().unwrap();
    req.headers_mut()
        .insert("Origin", "http://app.example".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(req).await.is_ok());
    // An Origin that is not visible ASCII is refused, not taken as absent.
    let mut req = url.clone().into_client_request().unwrap();
    req.headers_mut().insert(
        "Origin",
        tokio_tungstenite::tungstenite::http::HeaderValue::from_bytes(b"http://\xe9vil.example")
            .unwrap(),
    );
    let err = tokio_tungstenite::connect_async(req).await.unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
    // Several Origin headers: refused, whichever comes first.
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .append("Origin", "http://app.example".parse().unwrap());
    req.headers_mut()
        .append("Origin", "http://evil.example".parse().unwrap());
    let err = tokio_tungstenite::connect_async(req).await.unwrap_err();
    assert!(err.to_string().contains("403"), "{err}");
}

#[tokio::test]
async fn expiring_token_is_told_and_closed_unless_refreshed() {
    let gw = Gateway::default().await;
    // Expires in 2 s and is not refreshed.
    let mut c = Client::connect(&gw.ws(&format!("token={}", token_ttl("acme", &[], 2)))).await;
    c.recv_type("connection.established").await;
    let told = c.recv().await;
    assert_eq!(told["data"]["code"], "token_expired");
    assert_eq!(c.closed().await.0, 4001);

    // Refreshed before expiry: stays open past the first token's expiry.
    let mut c = Client::connect(&gw.ws(&format!("token={}", token_ttl("acme", &[], 2)))).await;
    c.recv_type("connection.established").await;
    c.subscribe(&["x"]).await;
    c.send(json!({"type": "auth.refresh", "token": token("globex", &[])}))
        .await;
    assert_eq!(
        c.recv().await["data"]["code"],
        "auth_refresh_failed",
        "another tenant's token is refused"
    );
    c.send(json!({"type": "auth.refresh", "token": token("acme", &[]), "requestId": "r1"}))
        .await;
    let ok = c.recv().await;
    assert_eq!(
        (ok["type"].as_str(), ok["requestId"].as_str()),
        (Some("auth.refreshed"), Some("r1"))
    );
    tokio::time::sleep(Duration::from_millis(2500)).await; // past the old expiry
    publish_ok(&gw, "acme", "x", json!({})).await;
    assert_eq!(c.events(1).await[0]["event_type"], "x");
}

#[tokio::test]
async fn heartbeat_pings_and_idle_timeout() {
    let mut cfg = config();
    cfg.heartbeat.ping_interval_seconds = 1;
    cfg.heartbeat.idle_timeout_seconds = 2;
    let gw = Gateway::start(cfg).await;
    let mut c = Client::open(&gw, "acme").await;
    // A server ping arrives within the interval.
    let got_ping = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            if let Some(Ok(Message::Ping(_))) = futures_util::StreamExt::next(&mut c.ws).await {
                return;
            }
        }
    })
    .await;
    assert!(got_ping.is_ok(), "no ping from the server");
    // A client that keeps reading answers pings (tungstenite replies) and
    // stays open past the idle timeout.
    c.expect_silence(Duration::from_secs(3)).await;
    c.send(json!({"type": "ping"})).await;
    assert_eq!(c.recv().await["type"], "pong");
    // One that neither reads nor writes is closed with 4002. (The wait is
    // the behaviour under test: the idle timeout.)
    // A raw socket is used so that no library answers pings behind our back.
    let silent = raw_upgrade(&gw, &format!("/ws?token={}", token("acme", &[]))).await;
    let frames = read_frames_until_eof(silent).await;
    let close = frames
        .iter()
        .find(|(op, _)| *op == 0x8)
        .expect("a close frame");
    assert_eq!(u16::from_be_bytes([close.1[0], close.1[1]]), 4002);
    assert!(
        frames.iter().any(|(op, _)| *op == 0x9),
        "pings were sent before giving up"
    );
}

async fn raw_upgrade(gw: &Gateway, path: &str) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        gw.addr
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    s
}

/// Server frames (unmasked) until the server closes: (opcode, payload).
async fn read_frames_until_eof(mut s: tokio::net::TcpStream) -> Vec<(u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut buf = Vec::new();
    tokio::time::timeout(DEADLINE, s.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let mut frames = Vec::new();
    let mut i = 0;
    while i + 2 <= buf.len() {
        let op = buf[i] & 0x0f;
        let (len, start) = match buf[i + 1] & 0x7f {
            126 => (u16::from_be_bytes([buf[i + 2], buf[i + 3]]) as usize, i + 4),
            n => (n as usize, i + 2),
        };
        frames.push((op, buf[start..start + len].to_vec()));
        i = start + len;
    }
    frames
}

/// A subscribe frame naming thousands of refused patterns gets a bounded
/// answer: ten error frames and one summary, not one per pattern.
#[tokio::test]
async fn many_refused_patterns_in_one_frame_get_a_bounded_answer() {
    let gw = Gateway::default().await;
    let mut c = Client::open(&gw, "acme").await;
    let bad: Vec<String> = (0..5000).map(|i| format!("a..{i}")).collect();
    let frame = json!({"type": "subscribe", "topics": bad}).to_string();
    c.send_raw(Message::Text(frame.clone().into())).await;
    // A valid subscribe after it: its confirmation marks the end.
    c.send(json!({"type": "subscribe", "topics": ["contact.*"]}))
        .await;
    let mut errors = Vec::new();
    let mut bytes = 0;
    loop {
        let m = c.recv().await;
        if m["type"] == "subscription.confirmed" {
            break;
        }
        assert_eq!(m["type"], "error", "{m}");
        bytes += m.to_string().len();
        errors.push(m);
    }
    assert_eq!(errors.len(), 11, "ten errors and a summary");
    assert!(
        errors[10]["data"]["message"]
            .as_str()
            .unwrap()
            .starts_with("4990 more patterns"),
        "{}",
        errors[10]
    );
    assert!(
        bytes < frame.len(),
        "{bytes} bytes of errors for a {} byte frame",
        frame.len()
    );
}

/// Events, and when each arrived, for `gw` with one subscriber (connected
/// with `query` added): a first event on a quiet connection, then two more
/// published right after it.
async fn arrivals_after_a_first_event(
    gw: &Gateway,
    query: &str,
) -> (std::time::Instant, Vec<(String, std::time::Instant)>) {
    let mut c =
        Client::connect(&gw.ws(&format!("token={}{query}", token("acme", &["subscribe"])))).await;
    assert_eq!(c.recv().await["type"], "connection.established");
    c.subscribe(&["burst.>"]).await;
    let start = std::time::Instant::now();
    let mut published = Vec::new();
    let mut got = Vec::new();
    published.push(publish_ok(gw, "acme", "burst.one", json!({})).await);
    let first = c.events(1).await;
    got.push((
        first[0]["event_id"].as_str().unwrap().to_owned(),
        std::time::Instant::now(),
    ));
    for topic in ["burst.two", "burst.three"] {
        published.push(publish_ok(gw, "acme", topic, json!({})).await);
    }
    for e in c.events(2).await {
        got.push((
            e["event_id"].as_str().unwrap().to_owned(),
            std::time::Instant::now(),
        ));
    }
    let ids: Vec<&str> = got.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids, published, "every event, once, in order");
    (start, got)
}

#[tokio::test]
async fn a_write_delay_gathers_what_follows_a_write_and_loses_nothing() {
    let delay = Duration::from_millis(1000);
    let mut cfg = config();
    cfg.websocket.write_delay_ms = delay.as_millis() as u64;
    let gw = Gateway::start(cfg).await;
    // The gateway's delay is a floor: a client asking for none still waits.
    let (start, got) = arrivals_after_a_first_event(&gw, "&write_delay_ms=0").await;
    // A quiet connection's first event is not held.
    assert!(
        got[0].1 - start < delay,
        "the first event waited {:?}",
        got[0].1 - start
    );
    // What follows within the delay is held until a delay after that
    // write (which happened after `start`), then written together.
    assert!(
        got[1].1 - start >= delay,
        "the second event was not held: {:?}",
        got[1].1 - start
    );
    assert!(
        got[2].1 - got[1].1 < Duration::from_millis(200),
        "the held events came apart: {:?}",
        got[2].1 - got[1].1
    );

    // Without a delay (the default), the same events are written at once.
    let gw = Gateway::default().await;
    let (start, got) = arrivals_after_a_first_event(&gw, "").await;
    assert!(
        got[2].1 - start < delay,
        "without a write delay the events waited {:?}",
        got[2].1 - start
    );
    // A client may ask for a delay itself (`?write_delay_ms=`).
    let (start, got) = arrivals_after_a_first_event(&gw, "&write_delay_ms=1000").await;
    assert!(
        got[1].1 - start >= delay,
        "the client's delay was not kept: {:?}",
        got[1].1 - start
    );
    // Up to a second; anything else refuses the upgrade with the JSON
    // error shape.
    for bad in ["1001", "-1", "soon", "70000"] {
        let refused = tokio_tungstenite::connect_async(gw.ws(&format!(
            "token={}&write_delay_ms={bad}",
            token("acme", &["subscribe"])
        )))
        .await
        .expect_err("no upgrade");
        let tokio_tungstenite::tungstenite::Error::Http(r) = refused else {
            panic!("{bad}: {refused}")
        };
        let body: serde_json::Value =
            serde_json::from_slice(r.body().as_deref().unwrap_or_default()).unwrap_or_default();
        assert_eq!(
            (r.status().as_u16(), body["error"]["code"].as_str()),
            (400, Some("invalid_query")),
            "{bad}: {body}"
        );
    }
}

#[tokio::test]
async fn a_drain_while_events_are_held_writes_them_first_and_resumes_after_them() {
    let mut cfg = config();
    cfg.websocket.write_delay_ms = 1000;
    let mut gw = Gateway::start(cfg).await;
    let mut c = Client::open(&gw, "acme").await;
    c.subscribe(&["held.>"]).await;
    publish_ok(&gw, "acme", "held.one", json!({})).await;
    c.events(1).await;
    // Within the delay after that write: both are held.
    let published = [
        publish_ok(&gw, "acme", "held.two", json!({})).await,
        publish_ok(&gw, "acme", "held.three", json!({})).await,
    ];
    gw.trigger_drain();
    let mut events = Vec::new();
    let reconnect = loop {
        let m = c.recv().await;
        match m["type"].as_str() {
            Some("event") => events.push(m["data"].clone()),
            Some("reconnect") => break m,
            _ => {}
        }
    };
    assert_eq!(ids(&events), published, "held events, once, in order");
    assert_eq!(reconnect["data"]["reason"], "draining");
    assert!(events[1]["metadata"]["cursor"].is_string(), "{events:?}");
    assert_eq!(
        reconnect["data"]["cursor"], events[1]["metadata"]["cursor"],
        "the client resumes after the last held event: {reconnect}"
    );
    assert_eq!(c.closed().await.0, 1012);
}

/// The next pong (events before it are returned), within `wait`.
async fn pong_within(c: &mut Client, wait: Duration) -> Vec<serde_json::Value> {
    let mut events = Vec::new();
    loop {
        let m = c.recv_within(wait).await;
        match m["type"].as_str() {
            Some("pong") => return events,
            Some("event") => events.push(m["data"].clone()),
            _ => {}
        }
    }
}

/// What a client sends is answered at once, whatever woke its connection
/// last: after bursts of events, and while a write delay holds events
/// back (the connection does not wait on its mailbox then), after a frame
/// with no answer and the held events' wake-ups. A lost wake-up of the
/// socket's read side would wait for the flush or the 30 s heartbeat.
#[tokio::test]
async fn client_frames_are_answered_at_once_after_event_wakeups() {
    // Far below the 30 s heartbeat and the 1 s delay: a lost wake-up
    // would wait for one of them.
    let prompt = Duration::from_millis(500);
    let gw = Gateway::default().await;
    let mut c = Client::open(&gw, "acme").await;
    c.subscribe(&["talk.>"]).await;
    for round in 0..10 {
        for i in 0..5 {
            publish_ok(&gw, "acme", "talk.burst", json!({"round": round, "i": i})).await;
        }
        assert_eq!(c.events(5).await.len(), 5);
        c.send(json!({"type": "ping"})).await;
        let between = pong_within(&mut c, prompt).await;
        assert!(between.is_empty(), "round {round}: {between:?}");
    }

    let mut cfg = config();
    cfg.websocket.write_delay_ms = 1000;
    let gw = Gateway::start(cfg).await;
    let mut c = Client::open(&gw, "acme").await;
    c.subscribe(&["held.>"]).await;
    publish_ok(&gw, "acme", "held.one", json!({})).await;
    c.events(1).await;
    // A frame with no answer: its wake-up uses up the task waker the
    // socket's last write left with the WebSocket layer.
    c.send_raw(Message::Pong(Default::default())).await;
    // Within the delay after that write: held. The second one's wake-up
    // finds the connection holding, not waiting on its mailbox: the
    // mailbox's task waker is used up too.
    let held = [
        publish_ok(&gw, "acme", "held.two", json!({})).await,
        publish_ok(&gw, "acme", "held.three", json!({})).await,
    ];
    let asked = std::time::Instant::now();
    c.send(json!({"type": "ping"})).await;
    let before = pong_within(&mut c, prompt).await;
    assert!(
        asked.elapsed() < prompt,
        "the pong waited {:?} (for the held events' flush?)",
        asked.elapsed()
    );
    // The held events still come, once and in order (the first was
    // queued on the socket, so the pong's write takes it along).
    let mut events = before;
    events.extend(c.events(held.len() - events.len()).await);
    assert_eq!(ids(&events), held);
    // And the connection still reads after that, every frame of a
    // segment (the second is read from the WebSocket layer's buffer, with
    // no wake-up of its own).
    for _ in 0..2 {
        let ping = json!({"type": "ping"}).to_string();
        c.ws.feed(Message::Text(ping.into())).await.unwrap();
    }
    c.ws.flush().await.unwrap();
    for _ in 0..2 {
        assert!(pong_within(&mut c, prompt).await.is_empty());
    }
}

/// Frames of every header size (7-bit, 16-bit and 64-bit lengths; small
/// ones gathered into one write, large ones written header and payload
/// apart) stay whole when the client stops reading and the socket takes
/// them a piece at a time; a ping sent meanwhile is answered once the
/// backlog is out, and nothing is lost, repeated or reordered.
#[tokio::test]
async fn frames_stay_whole_across_partial_writes_and_pings_are_answered_after_them() {
    use futures_util::StreamExt;
    let gw = Gateway::default().await;
    let mut c = Client::open(&gw, "acme").await;
    c.subscribe(&["bulk.*"]).await;
    // ~12 MB: far more than a client's socket buffers take while it does
    // not read, so the gateway's writes stop part-way through frames.
    let sizes = [3usize, 200, 20_000, 70_000, 120_000];
    let n = 120;
    let publisher = {
        let url = gw.http();
        let t = token("acme", &["publish"]);
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            for i in 0..n {
                let pad = "y".repeat(sizes[i % sizes.len()]);
                let r = http
                    .post(format!("{url}/api/realtime/publish/"))
                    .bearer_auth(&t)
                    .json(&json!({"event_type": "bulk.x", "data": {"i": i, "pad": pad}}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
            }
        })
    };
    publisher.await.unwrap();
    c.send_raw(Message::Ping(b"are you there".to_vec().into()))
        .await;
    let mut next = 0;
    let mut pong = false;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while next < n || !pong {
        let m = tokio::time::timeout_at(deadline, c.ws.next())
            .await
            .expect("backlog and pong within the deadline")
            .expect("connection open")
            .expect("a well-formed frame");
        match m {
            Message::Pong(p) => {
                assert_eq!(&p[..], b"are you there");
                pong = true;
            }
            Message::Text(t) => {
                let v: serde_json::Value = serde_json::from_str(&t).unwrap();
                if v["type"] == "event" {
                    assert_eq!(v["data"]["data"]["i"], next, "in order, once each");
                    let pad = v["data"]["data"]["pad"].as_str().unwrap();
                    assert_eq!(pad.len(), sizes[next % sizes.len()]);
                    assert!(pad.bytes().all(|b| b == b'y'));
                    next += 1;
                }
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The upgrade answers RFC 6455's example key with the RFC's accept value,
/// and refuses requests that are not WebSocket upgrades with a 4xx
/// before any connection exists.
#[tokio::test]
async fn the_upgrade_is_checked_and_answered_as_rfc_6455_says() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let gw = Gateway::default().await;
    let t = token("acme", &["subscribe"]);
    let head = |extra: &str| {
        format!(
            "GET /ws?token={t} HTTP/1.1\r\nHost: {}\r\n{extra}\r\n",
            gw.addr
        )
    };
    let answer = |req: String| async move {
        let mut s = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut got = Vec::new();
        let mut b = [0u8; 1];
        while !got.ends_with(b"\r\n\r\n") {
            let read = tokio::time::timeout(DEADLINE, s.read(&mut b))
                .await
                .unwrap();
            if read.unwrap() == 0 {
                break;
            }
            got.push(b[0]);
        }
        String::from_utf8_lossy(&got).to_lowercase()
    };
    let ok = answer(head(
        "Upgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
    ))
    .await;
    assert!(ok.starts_with("http/1.1 101"), "{ok}");
    assert!(
        ok.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo=\r\n"),
        "{ok}"
    );
    assert!(ok.contains("upgrade: websocket\r\n"), "{ok}");
    for bad in [
        // No key.
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n",
        // Another protocol version.
        "Upgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n",
        // Not an upgrade at all.
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n",
    ] {
        let got = answer(head(bad)).await;
        assert!(got.starts_with("http/1.1 4"), "{bad:?} -> {got}");
    }
}

/// A client frame as RFC 6455 says clients send it: masked.
fn masked(first: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut frame = vec![first, 0x80 | u8::try_from(payload.len()).unwrap()];
    frame.extend(mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// Client frames are read as RFC 6455 says: one that breaks the protocol
/// is answered with the close code that says why (1002; 1007 for text that
/// is not UTF-8) instead of a dropped connection, a message may come in
/// fragments with a ping between them, and a client's close is echoed.
#[tokio::test]
async fn client_frames_are_read_and_refused_as_rfc_6455_says() {
    use tokio::io::AsyncWriteExt;
    let gw = Gateway::default().await;
    let path = format!("/ws?token={}", token("acme", &["subscribe"]));
    let close_code = |frames: &[(u8, Vec<u8>)]| {
        let (_, payload) = frames
            .iter()
            .find(|(op, _)| *op == 0x8)
            .unwrap_or_else(|| panic!("no close frame in {frames:?}"));
        u16::from_be_bytes([payload[0], payload[1]])
    };
    let mut rsv1 = masked(0x81, b"{}");
    rsv1[0] |= 0x40;
    for (frame, code) in [
        // Unmasked.
        (vec![0x81, 0x02, b'{', b'}'], 1002),
        (rsv1, 1002),
        // A continuation of nothing.
        (masked(0x80, b"{}"), 1002),
        (masked(0x81, &[0xc3, 0x28]), 1007),
    ] {
        let mut s = raw_upgrade(&gw, &path).await;
        s.write_all(&frame).await.unwrap();
        let frames = read_frames_until_eof(s).await;
        assert_eq!(close_code(&frames), code, "{frame:x?}: {frames:?}");
    }

    let mut s = raw_upgrade(&gw, &path).await;
    let request = br#"{"type":"ping","requestId":"in-fragments"}"#;
    let mut bytes = masked(0x01, &request[..9]);
    bytes.extend(masked(0x89, b"p"));
    bytes.extend(masked(0x00, &request[9..20]));
    bytes.extend(masked(0x80, &request[20..]));
    bytes.extend(masked(0x88, &1000u16.to_be_bytes()));
    s.write_all(&bytes).await.unwrap();
    let frames = read_frames_until_eof(s).await;
    assert!(frames.contains(&(0xA, b"p".to_vec())), "{frames:?}");
    let pong = frames
        .iter()
        .filter(|(op, _)| *op == 0x1)
        .map(|(_, p)| serde_json::from_slice::<serde_json::Value>(p).unwrap())
        .find(|m| m["type"] == "pong");
    assert_eq!(
        pong.map(|m| m["requestId"].clone()),
        Some(json!("in-fragments")),
        "{frames:?}"
    );
    assert_eq!(frames.last(), Some(&(0x8, 1000u16.to_be_bytes().to_vec())));
}
