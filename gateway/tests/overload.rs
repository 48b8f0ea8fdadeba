//! Overload protection over real sockets: a reconnect storm is admitted at
//! the configured connect rate (per address, per tenant) while the clients
//! already connected keep receiving everything; a saturated process sheds
//! new connections (1013, HTTP 503 with Retry-After) and recovers.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Opens a WebSocket as `tenant` and says what came first: the hello, or a
/// close (code, reason).
async fn attempt(gw: &Gateway, tenant: &str) -> Result<Client, (u16, String)> {
    let mut c = Client::connect(&gw.ws(&format!("token={}", token(tenant, &["subscribe"])))).await;
    loop {
        match tokio::time::timeout(DEADLINE, c.ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => {
                let v: Value = serde_json::from_str(&t).expect("json");
                assert_eq!(v["type"], "connection.established", "{v}");
                return Ok(c);
            }
            Ok(Some(Ok(Message::Close(Some(f))))) => {
                return Err((u16::from(f.code), f.reason.to_string()));
            }
            Ok(Some(Ok(_))) => {}
            other => panic!("no hello and no close: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reconnect_storm_is_admitted_at_the_connect_rate_and_the_connected_lose_nothing() {
    let mut cfg = config();
    cfg.overload.connects_per_second_per_address = 40;
    cfg.overload.connects_per_second_per_tenant = 1000;
    cfg.overload.connect_burst_seconds = 1;
    let gw = Gateway::start(cfg).await;
    // Five clients connected before the storm, subscribed.
    let mut steady = Vec::new();
    for _ in 0..5 {
        let mut c = attempt(&gw, "acme").await.expect("admitted");
        c.subscribe(&["orders.*"]).await;
        steady.push(c);
    }
    // 300 clients from the same address at once, while events flow.
    let storm: Vec<_> = (0..300)
        .map(|_| {
            let ws = gw.ws(&format!("token={}", token("acme", &["subscribe"])));
            tokio::spawn(async move {
                let mut c = Client::connect(&ws).await;
                loop {
                    match c.ws.next().await {
                        Some(Ok(Message::Text(_))) => return Ok(c),
                        Some(Ok(Message::Close(Some(f)))) => {
                            return Err((u16::from(f.code), f.reason.to_string()));
                        }
                        Some(Ok(_)) => {}
                        other => panic!("{other:?}"),
                    }
                }
            })
        })
        .collect();
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(publish_ok(&gw, "acme", "orders.eu", json!({ "i": i })).await);
    }
    let mut admitted = Vec::new();
    let mut refused = 0;
    for t in storm {
        match t.await.expect("task") {
            Ok(c) => admitted.push(c),
            Err((code, reason)) => {
                assert_eq!(code, 1013, "{reason}");
                assert!(
                    reason.contains("too many new connections from this address"),
                    "{reason}"
                );
                refused += 1;
            }
        }
    }
    // The burst (35 left after the steady five) plus what the rate refilled
    // while the storm arrived.
    assert!(
        admitted.len() >= 30 && admitted.len() <= 120,
        "admitted {} of 300",
        admitted.len()
    );
    assert_eq!(admitted.len() + refused, 300);
    for c in &mut steady {
        let got: Vec<Value> = c
            .events(20)
            .await
            .iter()
            .map(|e| e["event_id"].clone())
            .collect();
        assert_eq!(
            got,
            ids.iter().map(|i| json!(i)).collect::<Vec<_>>(),
            "every event, in order"
        );
    }
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "switchboard_websocket_rejected_total{reason=\"connect_rate\"}"
        ) as usize,
        refused
    );
    // The bucket refills: a second later, new connections are admitted again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    attempt(&gw, "acme")
        .await
        .expect("admitted after the refill");
    // SSE answers 429 with Retry-After once the address is over its rate.
    let sse = format!("{}/api/realtime/sse/?topics=orders.*", gw.http());
    let http = reqwest::Client::new();
    let mut limited = None;
    for _ in 0..100 {
        let r = http
            .get(&sse)
            .bearer_auth(token("acme", &["subscribe"]))
            .send()
            .await
            .expect("sse");
        if r.status() == 429 {
            limited = Some(r);
            break;
        }
    }
    let r = limited.expect("a 429 within 100 streams");
    let after: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((5..=10).contains(&after), "{after}");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "connect_rate_limited");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_tenants_storm_does_not_take_another_tenants_connects() {
    let mut cfg = config();
    cfg.overload.connects_per_second_per_tenant = 10;
    cfg.overload.connect_burst_seconds = 1;
    let gw = Gateway::start(cfg).await;
    let mut outcomes = Vec::new();
    for _ in 0..30 {
        outcomes.push(attempt(&gw, "noisy").await.map(|_| ()));
    }
    let admitted = outcomes.iter().filter(|o| o.is_ok()).count();
    assert!((10..=13).contains(&admitted), "admitted {admitted}");
    let refused = outcomes
        .iter()
        .find_map(|o| o.as_ref().err())
        .expect("refusals");
    assert_eq!(refused.0, 1013);
    assert!(refused.1.contains("for this tenant"), "{}", refused.1);
    attempt(&gw, "quiet")
        .await
        .expect("another tenant is not limited by the first");
}

/// Current-thread runtime: the test blocks the gateway's only thread, as a
/// saturated process would be.
#[tokio::test(flavor = "current_thread")]
async fn a_saturated_gateway_sheds_new_connections_and_keeps_serving_the_open_ones() {
    let mut cfg = config();
    cfg.overload.max_scheduler_lag_ms = 100;
    let gw = Gateway::start(cfg).await;
    let mut open = attempt(&gw, "acme").await.expect("admitted");
    open.subscribe(&["orders.*"]).await;
    // Something hogs the runtime for 400 ms (a CPU-bound burst).
    std::thread::sleep(Duration::from_millis(400));
    let (code, reason) = match attempt(&gw, "acme").await {
        Err(c) => c,
        Ok(_) => panic!("admitted while saturated"),
    };
    assert_eq!(code, 1013);
    assert!(reason.contains("overloaded"), "{reason}");
    let r = reqwest::get(format!(
        "{}/api/realtime/poll/?topics=orders.*&timeout=0&token={}",
        gw.http(),
        token("acme", &["subscribe"])
    ))
    .await
    .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().contains_key("retry-after"));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded");
    // A new Socket.IO session too (503, which socket.io-client retries).
    let r = reqwest::get(format!("{}/socket.io/?EIO=4&transport=polling", gw.http()))
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    // The open connection still gets its events.
    let id = publish_ok(&gw, "acme", "orders.eu", json!({})).await;
    assert_eq!(open.events(1).await[0]["event_id"], id);
    // Once the runtime keeps up again, connections are admitted.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match attempt(&gw, "acme").await {
            Ok(_) => break,
            Err((1013, _)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    let m = gw.metrics().await;
    assert!(
        metric(
            &m,
            "switchboard_websocket_rejected_total{reason=\"overloaded\"}"
        ) >= 2.0
    );
}

/// A burst of connections arriving while the gateway is not accepting (a
/// stalled moment, as when a dead gateway's clients all arrive at once)
/// waits in the kernel's accept queue and is served, instead of having its
/// handshakes dropped past the first 128 and retried by the clients a second
/// or more later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_connections_waits_in_the_accept_queue_while_the_gateway_is_busy() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const BURST: usize = 1000;
    let dir = common::nats::TempDir::new("backlog");
    let gw = common::nats::GatewayProc::start(&dir, "gw", "");
    gw.wait_ready().await;
    let pid = gw.pid().expect("running").to_string();
    let signal = |sig: &str| {
        let sent = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill");
        assert!(sent.success(), "kill {sig}");
    };
    // Stopped, the gateway accepts nothing: only the kernel answers.
    signal("-STOP");
    let address = format!("127.0.0.1:{}", gw.port);
    let connects = (0..BURST).map(|_| {
        let address = address.clone();
        async move {
            tokio::time::timeout(
                Duration::from_millis(800),
                tokio::net::TcpStream::connect(address),
            )
            .await
        }
    });
    let results = futures_util::future::join_all(connects).await;
    signal("-CONT");
    let mut streams = Vec::new();
    for r in results {
        if let Ok(Ok(s)) = r {
            streams.push(s);
        }
    }
    assert_eq!(
        streams.len(),
        BURST,
        "only {} of {BURST} connections completed their handshake within 800 ms while the gateway was busy",
        streams.len()
    );
    // Resumed, the gateway serves every one of them.
    let served = streams.into_iter().map(|mut s| async move {
        s.write_all(b"GET /api/realtime/health/ HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
            .await?;
        let mut answer = Vec::new();
        s.read_to_end(&mut answer).await?;
        Ok::<bool, std::io::Error>(answer.starts_with(b"HTTP/1.1 200"))
    });
    let answers = tokio::time::timeout(
        Duration::from_secs(20),
        futures_util::future::join_all(served),
    )
    .await
    .expect("every queued connection answered");
    let ok = answers.iter().filter(|a| matches!(a, Ok(true))).count();
    assert_eq!(ok, BURST, "{ok} of {BURST} queued connections were served");
}
