//! Slow consumers, exact metrics, and graceful drain of the real binary.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test]
async fn a_slow_consumer_is_cut_off_and_never_slows_the_others() {
    let mut cfg = config();
    cfg.limits.outbound_queue = 16;
    let gw = Gateway::start(cfg).await;
    let mut slow = Client::open(&gw, "acme").await;
    slow.subscribe(&["bulk.*"]).await;
    let mut fast = Client::open(&gw, "acme").await;
    fast.subscribe(&["bulk.*"]).await;
    // ~19 MB in total: far more than the socket buffers of a client that
    // stops reading can absorb.
    let payload = "x".repeat(64 * 1024);
    let n = 300;
    let publisher = {
        let url = gw.http();
        let t = token("acme", &["publish"]);
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            for i in 0..n {
                let r = http
                    .post(format!("{url}/api/realtime/publish/"))
                    .bearer_auth(&t)
                    .json(&json!({"event_type": "bulk.x", "data": {"i": i, "pad": payload}}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
            }
        })
    };
    // The fast client gets every event, in order, while the slow one reads nothing.
    let got = fast.events(n).await;
    assert!(got.iter().enumerate().all(|(i, e)| e["data"]["i"] == i));
    publisher.await.unwrap();

    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            r#"switchboard_websocket_disconnected_total{reason="slow_consumer"}"#
        ),
        1.0
    );
    assert!(
        metric(
            &m,
            r#"switchboard_event_dropped_total{reason="slow_consumer"}"#
        ) >= 1.0
    );
    // The slow client finds fewer events than were published, then the end.
    let mut seen = 0;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match tokio::time::timeout_at(deadline, slow.ws.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Text(_))) => seen += 1,
            Some(Ok(Message::Close(f))) => {
                assert_eq!(f.map(|f| u16::from(f.code)), Some(4008));
                break;
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => break,
        }
    }
    assert!(seen < n, "slow consumer got {seen} of {n}");
}

#[tokio::test]
async fn metrics_move_by_exactly_the_scenario() {
    let gw = Gateway::default().await;
    let mut a = Client::open(&gw, "acme").await;
    a.subscribe(&["m.*"]).await;
    let mut b = Client::open(&gw, "acme").await;
    b.subscribe(&["m.both", "m.*"]).await;
    publish_ok(&gw, "acme", "m.both", json!({})).await; // 2 deliveries (b once despite 2 patterns)
    publish_ok(&gw, "acme", "x.none", json!({})).await; // no subscriber
    let body = json!({"event_type": "m.key", "data": {}, "idempotency_key": "k"});
    publish(&gw, &token("acme", &["publish"]), body.clone()).await;
    publish(&gw, &token("acme", &["publish"]), body).await; // duplicate
    a.events(2).await;
    b.events(2).await;
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "switchboard_websocket_connected_total"), 2.0);
    assert_eq!(metric(&m, "switchboard_websocket_active"), 2.0);
    assert_eq!(metric(&m, "switchboard_subscriptions_active"), 3.0);
    assert_eq!(metric(&m, "switchboard_event_published_total"), 3.0);
    assert_eq!(metric(&m, "switchboard_event_deduplicated_total"), 1.0);
    assert_eq!(metric(&m, "switchboard_event_delivered_total"), 4.0);
    assert_eq!(
        metric(
            &m,
            r#"switchboard_event_dropped_total{reason="no_subscribers"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(&m, "switchboard_delivery_latency_seconds_count"),
        3.0,
        "one publish-to-deliver observation per routed event"
    );
    assert!(!m.contains("acme"), "no tenant names in metric labels");

    drop(a);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let m = gw.metrics().await;
        if metric(&m, "switchboard_websocket_active") == 1.0 {
            assert_eq!(
                metric(
                    &m,
                    r#"switchboard_websocket_disconnected_total{reason="client"}"#
                ),
                1.0
            );
            assert_eq!(metric(&m, "switchboard_subscriptions_active"), 2.0);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (s, h) = get_json(&format!("{}/api/realtime/health/", gw.http()), None).await;
    assert_eq!(s, 200);
    assert_eq!(h["status"], "healthy");
    assert_eq!(h["components"]["event_bus"], "healthy");
    assert!(h["timestamp"].is_string());
}

use common::nats::free_port;

#[tokio::test]
async fn sigterm_drains_the_real_binary_spreading_reconnects() {
    let port = free_port();
    let admin_port = free_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin_port}"),
            "--drain-seconds",
            "2",
        ])
        .env("SWITCHBOARD_HS256_SECRET", SECRET)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let admin = format!("http://127.0.0.1:{admin_port}");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        if let Ok(r) = reqwest::get(format!("{admin}/readyz")).await
            && r.status() == 200
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gateway did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ws = |t: String| format!("ws://127.0.0.1:{port}/ws?token={t}");
    let mut clients = Vec::new();
    for _ in 0..6 {
        let mut c = Client::connect(&ws(token("acme", &[]))).await;
        c.recv_type("connection.established").await;
        c.subscribe(&["d.*"]).await;
        clients.push(c);
    }
    // Events already delivered must not come again after the reconnect: the
    // cursor in `reconnect` is the last one each client received.
    let http = reqwest::Client::new();
    let mut last_id = String::new();
    for n in 0..2 {
        let r = http
            .post(format!("{base}/api/realtime/publish/"))
            .bearer_auth(token("acme", &["publish"]))
            .json(&json!({"event_type": "d.x", "data": {"n": n}}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        last_id = r.json::<Value>().await.unwrap()["event_id"]
            .as_str()
            .unwrap()
            .to_owned();
    }
    for c in &mut clients {
        let got = c.events(2).await;
        assert_eq!(got[1]["event_id"], last_id.as_str());
    }
    let started = std::time::Instant::now();
    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );

    // Readiness turns false and new connections are refused while draining.
    loop {
        let r = reqwest::get(format!("{admin}/readyz")).await.unwrap();
        if r.status() == 503 {
            break;
        }
        assert!(started.elapsed() < DEADLINE);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = tokio_tungstenite::connect_async(ws(token("acme", &[])))
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("503"), "{refused}");

    // Every client is told to reconnect (with a cursor), then closed with 1012.
    let mut at = Vec::new();
    for c in &mut clients {
        let m = c.recv_type("reconnect").await;
        assert_eq!(m["data"]["reason"], "draining");
        assert_eq!(m["data"]["cursor"], last_id.as_str());
        assert_eq!(c.closed().await.0, 1012);
        at.push(started.elapsed());
    }
    let first = at.iter().min().unwrap();
    let last = at.iter().max().unwrap();
    assert!(
        *last <= Duration::from_millis(3500),
        "all gone within the drain period: {at:?}"
    );
    assert!(
        *last - *first >= Duration::from_millis(200),
        "reconnects are spread, not a storm: {at:?}"
    );

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "process did not exit after drain"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn tenant_labels_are_opt_in_and_capped() {
    let mut cfg = config();
    cfg.telemetry.tenant_labels = true;
    cfg.telemetry.tenant_label_cap = 2;
    let gw = Gateway::start(cfg).await;
    let mut clients = Vec::new();
    for t in ["t1", "t2", "t3"] {
        let mut c = Client::open(&gw, t).await;
        c.subscribe(&["x"]).await;
        publish_ok(&gw, t, "x", json!({})).await;
        c.events(1).await;
        clients.push(c);
    }
    let m = gw.metrics().await;
    let labelled: Vec<&str> = m
        .lines()
        .filter(|l| l.starts_with("switchboard_tenant_events_delivered_total{"))
        .collect();
    assert_eq!(labelled.len(), 3, "{labelled:?}");
    assert_eq!(
        metric(
            &m,
            r#"switchboard_tenant_events_delivered_total{tenant="t1"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            r#"switchboard_tenant_events_delivered_total{tenant="t2"}"#
        ),
        1.0
    );
    assert_eq!(
        metric(
            &m,
            r#"switchboard_tenant_events_delivered_total{tenant="other"}"#
        ),
        1.0
    );
}

#[tokio::test]
async fn metrics_and_probes_are_on_the_admin_port_only_and_negotiate_their_format() {
    let gw = Gateway::default().await;
    for path in ["/metrics", "/healthz", "/readyz"] {
        let public = reqwest::get(format!("{}{path}", gw.http())).await.unwrap();
        assert_eq!(
            public.status(),
            404,
            "{path} must not be on the client port"
        );
        let admin = reqwest::get(format!("{}{path}", gw.admin())).await.unwrap();
        assert_eq!(admin.status(), 200, "{path} on the admin port");
    }
    // The seed clients' health answer stays where they look for it.
    let (s, _) = get_json(&format!("{}/api/realtime/health/", gw.http()), None).await;
    assert_eq!(s, 200);

    let http = reqwest::Client::new();
    let plain = http
        .get(format!("{}/metrics", gw.admin()))
        .send()
        .await
        .unwrap();
    assert_eq!(
        plain.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let text = plain.text().await.unwrap();
    assert!(text.contains("# TYPE switchboard_websocket_connected_total counter\n"));
    assert!(!text.contains("# EOF"));

    let om = http
        .get(format!("{}/metrics", gw.admin()))
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        om.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let text = om.text().await.unwrap();
    assert!(text.contains("# TYPE switchboard_websocket_connected counter\n"));
    assert!(text.trim_end().ends_with("# EOF"));
}

/// A bad token is logged and counted on every transport, not only on
/// WebSocket upgrades.
#[tokio::test]
async fn refused_tokens_are_logged_and_counted_on_every_transport() {
    let port = free_port();
    let admin_port = free_port();
    let log = std::env::temp_dir().join(format!("sb-auth-log-{}", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin_port}"),
            "--log-format",
            "json",
        ])
        .env("SWITCHBOARD_HS256_SECRET", SECRET)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let admin = format!("http://127.0.0.1:{admin_port}");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !reqwest::get(format!("{admin}/readyz"))
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(tokio::time::Instant::now() < deadline, "not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let http = reqwest::Client::new();
    let bad = "not-a-token";
    let answers = [
        http.get(format!("{base}/api/realtime/sse/?topics=a&token={bad}"))
            .send()
            .await,
        http.get(format!(
            "{base}/api/realtime/poll/?topics=a&timeout=0&token={bad}"
        ))
        .send()
        .await,
        http.post(format!("{base}/api/realtime/publish/"))
            .bearer_auth(bad)
            .json(&json!({"event_type": "a", "data": {}}))
            .send()
            .await,
    ];
    for a in answers {
        assert_eq!(a.unwrap().status(), 401);
    }
    let metrics = scrape(&admin).await;
    assert_eq!(
        metric(&metrics, r#"switchboard_errors_total{kind="auth"}"#),
        3.0
    );
    let _ = child.kill();
    let _ = child.wait();
    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    for transport in ["sse", "longpoll", "publish"] {
        assert!(
            text.lines()
                .any(|l| l.contains("request rejected: unauthorized")
                    && l.contains(&format!("\"transport\":\"{transport}\""))),
            "no log line for {transport}:\n{text}"
        );
    }
}
