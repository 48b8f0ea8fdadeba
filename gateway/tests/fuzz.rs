//! Bounded fuzzing on the stable toolchain: generated hostile input for the
//! client frame parser, the publish body, JWT headers and cursors. Nothing
//! may panic, and the gateway must still serve afterwards. (Deeper,
//! coverage-guided runs: the cargo-fuzz targets in `gateway/fuzz/`, which
//! need a nightly toolchain.)

mod common;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use common::*;
use futures_util::StreamExt;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::TestRunner;
use serde_json::{Value, json};
use switchboard_gateway::auth::Verifier;
use switchboard_gateway::event::Cursor;
use tokio_tungstenite::tungstenite::Message;

/// Values from a strategy, reproducibly (a fixed seed).
fn samples<S: Strategy>(strategy: S, n: usize) -> Vec<S::Value> {
    let mut runner = TestRunner::deterministic();
    (0..n)
        .map(|_| strategy.new_tree(&mut runner).unwrap().current())
        .collect()
}

/// Any JSON value, nested a few levels.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,20}".prop_map(Value::from),
        prop::sample::select(vec![
            "subscribe",
            "unsubscribe",
            "cursor.update",
            "ping",
            "auth.refresh",
            "deal.*",
            "*",
            ">",
            "a..b",
            "5f3a-1",
            "ffffffffffffffffff-99999999999999999999999",
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..8).prop_map(Value::from),
            prop::collection::btree_map(
                prop::sample::select(vec![
                    "type",
                    "topics",
                    "channel",
                    "requestId",
                    "cursor",
                    "token",
                    "event_type",
                    "data",
                    "company_id",
                    "tenant",
                    "region",
                    "gdpr_context",
                    "idempotency_key",
                    "events",
                    "x",
                ])
                .prop_map(String::from),
                inner,
                0..6,
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A client message: a known type with random fields, or anything.
fn client_frame() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => (
            prop::sample::select(vec!["subscribe", "unsubscribe", "cursor.update", "ping", "auth.refresh", "nope"]),
            json_value(),
        )
            .prop_map(|(kind, v)| {
                let mut m = match v {
                    Value::Object(m) => m,
                    other => [("topics".to_owned(), other)].into_iter().collect(),
                };
                m.insert("type".into(), kind.into());
                Value::Object(m).to_string()
            }),
        1 => json_value().prop_map(|v| v.to_string()),
        1 => ".{0,200}",
    ]
}

#[tokio::test]
async fn hostile_client_frames_never_break_a_connection() {
    let gw = Gateway::default().await;
    let mut c = Client::open(&gw, "acme").await;
    let frames = samples(client_frame(), 400);
    let mut answers = std::collections::BTreeMap::<String, usize>::new();
    for (i, f) in frames.iter().enumerate() {
        c.send_raw(Message::Text(f.clone().into())).await;
        // Every fortieth frame, the connection still answers.
        if i % 40 == 39 {
            c.send(json!({"type": "ping", "requestId": format!("alive-{i}")}))
                .await;
            let deadline = tokio::time::Instant::now() + DEADLINE;
            loop {
                let m = tokio::time::timeout_at(deadline, c.ws.next())
                    .await
                    .expect("an answer before the deadline")
                    .expect("the connection is open")
                    .expect("no websocket error");
                match m {
                    Message::Text(t) => {
                        let v: Value = serde_json::from_str(&t).expect("every answer is JSON");
                        if v["type"] == "pong" && v["requestId"] == format!("alive-{i}") {
                            break;
                        }
                        let kind = match v["data"]["code"].as_str() {
                            Some(code) => format!("error:{code}"),
                            None => v["type"].as_str().unwrap_or("?").to_owned(),
                        };
                        *answers.entry(kind).or_default() += 1;
                    }
                    Message::Close(f) => panic!(
                        "closed after frame {i} ({f:?}): {:?}",
                        &frames[i.saturating_sub(39)..=i]
                    ),
                    _ => {}
                }
            }
        }
    }
    // The input reached the parser's every branch: refusals of several
    // kinds and accepted requests alike.
    eprintln!("answers to {} hostile frames: {answers:?}", frames.len());
    let errors = answers.keys().filter(|k| k.starts_with("error:")).count();
    assert!(errors >= 4, "{answers:?}");
    assert!(
        answers.keys().any(|k| !k.starts_with("error:")),
        "{answers:?}"
    );
}

#[tokio::test]
async fn hostile_publish_bodies_are_answered_never_with_a_server_error() {
    let gw = Gateway::default().await;
    let http = reqwest::Client::new();
    let publisher = token("acme", &["publish"]);
    let bodies = samples(
        prop_oneof![
            2 => json_value().prop_map(|v| v.to_string()),
            2 => (json_value(), json_value()).prop_map(|(data, extra)| {
                let mut m = match extra { Value::Object(m) => m, _ => Default::default() };
                m.insert("event_type".into(), "deal.won".into());
                m.insert("data".into(), data);
                Value::Object(m).to_string()
            }),
            1 => ".{0,100}",
        ],
        300,
    );
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for body in &bodies {
        let r = http
            .post(format!("{}/api/realtime/publish/", gw.http()))
            .bearer_auth(&publisher)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        *statuses.entry(status).or_default() += 1;
        assert!(
            [200, 201, 400, 403, 413].contains(&status),
            "{status} for {body}"
        );
        let answer: Value = r.json().await.expect("a JSON answer");
        if status >= 400 {
            assert!(answer["error"]["code"].is_string(), "{answer}");
        }
    }
    eprintln!(
        "statuses of {} hostile publishes: {statuses:?}",
        bodies.len()
    );
    assert!(
        statuses.len() >= 3 && statuses.contains_key(&201),
        "{statuses:?}"
    );
    let (s, health) = get_json(&format!("{}/api/realtime/health/", gw.http()), None).await;
    assert_eq!((s, &health["status"]), (200, &json!("healthy")));
}

#[tokio::test]
async fn tokens_that_are_not_ours_are_refused_without_panicking() {
    let verifier = Verifier::new(&config().auth).unwrap();
    let b64 = |v: &Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let headers = samples(json_value(), 150);
    let claims = samples(json_value(), 150);
    let mut tried = 0;
    for (h, c) in headers.iter().zip(&claims) {
        for header in [
            h.clone(),
            json!({"alg": "none", "typ": "JWT"}),
            json!({"alg": "HS256", "kid": h}),
            json!({"alg": "RS256", "jku": "http://127.0.0.1:1/jwks", "x5u": h}),
        ] {
            for sig in ["", "AAAA", "!!!!"] {
                let t = format!("{}.{}.{sig}", b64(&header), b64(c));
                assert!(verifier.verify(&t).await.is_err(), "accepted {t}");
                tried += 1;
            }
        }
    }
    for raw in samples(".{0,300}", 300) {
        assert!(verifier.verify(&raw).await.is_err());
        tried += 1;
    }
    assert!(tried > 2000);
}

proptest! {
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn cursors_parse_or_refuse_and_print_back(s in ".{0,60}") {
        if let Ok(c) = Cursor::parse(&s) {
            prop_assert_eq!(Cursor::parse(&c.to_string()).unwrap(), c);
        }
        let _ = Cursor::parse_lenient(&s);
    }

    #[test]
    fn every_cursor_prints_as_one_that_parses(epoch in any::<u64>(), seq in any::<u64>()) {
        let c = Cursor { epoch, seq };
        prop_assert_eq!(Cursor::parse(&c.to_string()).unwrap(), c);
    }
}
