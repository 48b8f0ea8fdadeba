//! The tenant policy bundle: allowlists, classes, limits, hot reload.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use serde_json::json;

const POLICY: &str = r#"
tenants:
  acme:
    subscribe:
      - pattern: "deal.*"
      - pattern: "contact.*"
      - pattern: "payment.>"
        class: critical
    publish:
      - pattern: "deal.>"
      - pattern: "contact.>"
    limits:
      max_connections: 2
      max_subscriptions_per_connection: 3
"#;

fn policy_file(dir: &tempdir::Dir, text: &str) -> PathBuf {
    let path = dir.path().join("policy.yaml");
    std::fs::write(&path, text).unwrap();
    path
}

mod tempdir {
    /// A scratch directory removed on drop.
    pub struct Dir(std::path::PathBuf);
    impl Dir {
        pub fn new(name: &str) -> Self {
            let p = std::env::temp_dir().join(format!("switchboard-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
        pub fn path(&self) -> &std::path::Path {
            &self.0
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Wait until the gateway has counted a refused policy reload.
async fn reload_error_seen(gw: &Gateway, what: &str) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while metric(
        &gw.metrics().await,
        r#"switchboard_policy_reloads_total{result="error"}"#,
    ) < 1.0
    {
        assert!(tokio::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn gateway_with_policy(dir: &tempdir::Dir) -> Gateway {
    let mut cfg = config();
    cfg.policy_file = Some(policy_file(dir, POLICY));
    cfg.policy_reload_seconds = 1;
    Gateway::start(cfg).await
}

#[tokio::test]
async fn allowlist_classes_and_limits() {
    let dir = tempdir::Dir::new("allow");
    let gw = gateway_with_policy(&dir).await;
    let mut c = Client::open(&gw, "acme").await;
    c.send(json!({"type": "subscribe", "topics": ["deal.*", "billing.*", "payment.card.charged", "*"]})).await;
    let mut errors = Vec::new();
    for _ in 0..3 {
        let e = c.recv().await;
        assert_eq!(e["data"]["code"], "topic_not_allowed", "{e}");
        errors.push(e["data"]["message"].as_str().unwrap().to_owned());
    }
    assert!(errors[0].contains("billing.*"));
    assert!(errors[1].contains("critical"), "{}", errors[1]);
    assert!(
        errors[2].contains("critical"),
        "a broad pattern may not reach critical topics: {}",
        errors[2]
    );
    assert_eq!(c.recv().await["data"]["topics"], json!(["deal.*"]));

    // Publish allowlist.
    let (s, _) = publish(
        &gw,
        &token("acme", &["publish"]),
        json!({"event_type": "billing.x"}),
    )
    .await;
    assert_eq!(s, 403);
    publish_ok(&gw, "acme", "deal.won", json!({})).await;
    assert_eq!(c.events(1).await[0]["event_type"], "deal.won");

    // Tenants without a policy are refused; acme has two connections at most.
    let mut g = Client::connect(&gw.ws(&format!("token={}", token("globex", &[])))).await;
    assert_eq!(g.closed().await.0, 4003);
    let _second = Client::open(&gw, "acme").await;
    let mut third = Client::connect(&gw.ws(&format!("token={}", token("acme", &[])))).await;
    assert_eq!(third.closed().await.0, 4030);
    // Long-poll counts too, and says why.
    let (s, b) = get_json(
        &format!("{}/api/realtime/poll/?topics=deal.*&timeout=0", gw.http()),
        Some(&token("acme", &[])),
    )
    .await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (429, Some("too_many_connections"))
    );
}

#[tokio::test]
async fn hot_reload_revokes_subscriptions_without_dropping_the_connection() {
    let dir = tempdir::Dir::new("reload");
    let gw = gateway_with_policy(&dir).await;
    let mut c = Client::open(&gw, "acme").await;
    c.subscribe(&["deal.*", "contact.*"]).await;

    // A broken edit is reported and changes nothing.
    policy_file(&dir, "tenants: [this is not a bundle");
    reload_error_seen(&gw, "invalid policy not noticed").await;
    publish_ok(&gw, "acme", "contact.added", json!({})).await;
    assert_eq!(c.events(1).await[0]["event_type"], "contact.added");

    // contact.* is withdrawn.
    policy_file(
        &dir,
        &POLICY.replace("      - pattern: \"contact.*\"\n", ""),
    );
    let revoked = c.recv_type("subscription.revoked").await;
    assert_eq!(revoked["data"]["topics"], json!(["contact.*"]));
    assert!(
        revoked["data"]["reason"]
            .as_str()
            .unwrap()
            .contains("not allowed")
    );
    publish_ok(&gw, "acme", "contact.added", json!({})).await;
    let deal = publish_ok(&gw, "acme", "deal.won", json!({})).await;
    assert_eq!(
        ids(&c.events(1).await),
        [deal],
        "same connection, only deal.* left"
    );
    // New subscriptions follow the new policy.
    c.send(json!({"type": "subscribe", "topics": ["contact.*"]}))
        .await;
    assert_eq!(c.recv().await["data"]["code"], "topic_not_allowed");
    assert_eq!(
        metric(
            &gw.metrics().await,
            r#"switchboard_policy_reloads_total{result="ok"}"#
        ),
        1.0
    );

    // The tenant is removed entirely: its connections are closed with 4003.
    policy_file(&dir, "tenants:\n  globex: {}\n");
    c.recv_type("subscription.revoked").await;
    assert_eq!(c.closed().await.0, 4003);
}

#[tokio::test]
async fn readiness_reports_the_policy_bundle_in_force() {
    use switchboard_config::PolicyBundle;
    let dir = tempdir::Dir::new("readiness");
    let gw = gateway_with_policy(&dir).await;
    let readyz = format!("{}/readyz", gw.admin());
    let digest = |text: &str| PolicyBundle::from_yaml(text).unwrap().digest();
    let (status, body) = get_json(&readyz, None).await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"state": "ready", "policy": digest(POLICY)}));

    // A bad edit keeps the bundle in force, and so its digest.
    policy_file(&dir, "tenants: [this is not a bundle");
    reload_error_seen(&gw, "reload error not seen").await;
    assert_eq!(get_json(&readyz, None).await.1["policy"], digest(POLICY));

    // A new bundle is reported once it is in force, whatever its layout.
    let next = "tenants:\n  globex:\n    subscribe: [{pattern: \"a.*\"}]\n";
    policy_file(&dir, next);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = get_json(&readyz, None).await;
        if body["policy"] == digest(next) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "still {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        digest(next),
        PolicyBundle::from_yaml(&PolicyBundle::from_yaml(next).unwrap().to_yaml())
            .unwrap()
            .digest()
    );
}

/// An emptied policy file is what a reader sees in the middle of a rewrite
/// (`>` in a shell truncates first). It is refused like any bad edit: the
/// bundle in force stays, and so do its tenants' connections. A gateway
/// will not start on one either.
#[tokio::test]
async fn an_emptied_policy_file_keeps_the_policy_and_the_connections() {
    use switchboard_config::PolicyBundle;
    let dir = tempdir::Dir::new("emptied");
    let gw = gateway_with_policy(&dir).await;
    let mut c = Client::open(&gw, "acme").await;
    c.subscribe(&["deal.*"]).await;

    policy_file(&dir, "");
    reload_error_seen(&gw, "the empty file was not refused").await;
    let (_, body) = get_json(&format!("{}/readyz", gw.admin()), None).await;
    assert_eq!(
        body["policy"],
        PolicyBundle::from_yaml(POLICY).unwrap().digest()
    );
    let deal = publish_ok(&gw, "acme", "deal.won", json!({})).await;
    assert_eq!(ids(&c.events(1).await), [deal], "acme is still connected");

    let mut cfg = config();
    cfg.policy_file = Some(policy_file(&dir, " \n"));
    let refused = switchboard_gateway::startup::build(cfg).await.err();
    let why = format!(
        "{:#}",
        refused.expect("a gateway started on an empty policy file")
    );
    assert!(why.contains("is empty"), "{why}");
}

/// `switchboard check` (the chart's `helm test`) against a gateway with a
/// policy: it passes for a tenant allowed the topic, and says why it fails
/// for one that is not, or with the wrong secret.
#[tokio::test]
async fn the_check_command_proves_a_round_trip_and_names_what_failed() {
    let dir = tempdir::Dir::new("check");
    let mut cfg = config();
    cfg.policy_file = Some(policy_file(
        &dir,
        "tenants:\n  switchboard-check:\n    subscribe: [{pattern: \"switchboard.check\"}]\n    publish: [{pattern: \"switchboard.check\"}]\n  acme:\n    subscribe: [{pattern: \"deal.*\"}]\n",
    ));
    let gw = Gateway::start(cfg).await;
    let check = |tenant: &str, secret: &str| {
        tokio::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["check", "--url", &gw.http(), "--tenant", tenant])
            .args(["--timeout-seconds", "10"])
            .env("SWITCHBOARD_HS256_SECRET", secret)
            .output()
    };
    let ok = check("switchboard-check", SECRET).await.unwrap();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("published and delivered"));

    let refused = check("acme", SECRET).await.unwrap();
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("topic_not_allowed"), "{why}");

    let bad_secret = check("switchboard-check", "wrong").await.unwrap();
    assert!(!bad_secret.status.success());
    let why = String::from_utf8_lossy(&bad_secret.stderr);
    assert!(why.contains("4001") || why.contains("401"), "{why}");
}

/// A critical class is decided by overlap, not containment: `*.captured`
/// reaches `payment.captured` under `payment.>` and is refused on every
/// transport; a critical topic is not publishable either.
#[tokio::test]
async fn critical_topics_do_not_leak_through_overlapping_patterns() {
    let dir = tempdir::Dir::new("critical");
    let mut cfg = config();
    cfg.policy_file = Some(policy_file(
        &dir,
        "tenants:\n  acme:\n    subscribe:\n      - pattern: \">\"\n      - pattern: \"payment.>\"\n        class: critical\n    publish:\n      - pattern: \">\"\n",
    ));
    let gw = Gateway::start(cfg).await;
    let mut c = Client::open(&gw, "acme").await;
    c.send(json!({"type": "subscribe", "topics": ["*.captured", "*.*.refunded", "deal.*"]}))
        .await;
    for _ in 0..2 {
        let e = c.recv().await;
        assert_eq!(e["data"]["code"], "topic_not_allowed", "{e}");
        assert!(
            e["data"]["message"].as_str().unwrap().contains("critical"),
            "{e}"
        );
    }
    assert_eq!(c.recv().await["type"], "subscription.confirmed");
    let (status, body) = get_json(
        &format!(
            "{}/api/realtime/poll/?topics=*.captured&timeout=0",
            gw.http()
        ),
        Some(&token("acme", &[])),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = publish(
        &gw,
        &token("acme", &["publish"]),
        json!({"event_type": "payment.captured", "data": {}}),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    // Nothing critical reached the subscriber; deal.* still flows.
    let deal = publish_ok(&gw, "acme", "deal.won", json!({})).await;
    assert_eq!(ids(&c.events(1).await), [deal]);
}
