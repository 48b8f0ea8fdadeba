//! The controllers end to end through kube's real `Client` and `Controller`,
//! against the in-process fake API server (see `fake_api`: no Kubernetes API
//! server can run on the machines these tests run on). The same scenario runs
//! against a real cluster with `--features real-cluster` and `KUBECONFIG`
//! (see docs/operator.md).

mod fake_api;

use std::sync::Arc;
use std::time::Duration;

use fake_api::{FakeApi, RenderedChart, User};
use kube::runtime::events::{Recorder, Reporter};
use serde_json::{Value, json};
use switchboard_operator::controller::{self, Context};
use switchboard_operator::metrics::Metrics;

const NS: &str = "switchboard";
const CRD_API: &str = "switchboard.dev/v1alpha1";

async fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn condition<'a>(obj: &'a Value, type_: &str) -> Option<&'a Value> {
    obj["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == type_)
}

async fn create(client: &kube::Client, api: &str, plural: &str, body: Value) {
    create_in(client, NS, api, plural, body).await
}

async fn create_in(client: &kube::Client, ns: &str, api: &str, plural: &str, mut body: Value) {
    body["metadata"]["namespace"] = json!(ns);
    let (group_path, _) = if api == "v1" {
        ("/api/v1".to_owned(), ())
    } else {
        (format!("/apis/{api}"), ())
    };
    let req = http::Request::post(format!("{group_path}/namespaces/{ns}/{plural}"))
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&body).unwrap())
        .unwrap();
    client.request::<Value>(req).await.unwrap();
}

async fn merge_patch(client: &kube::Client, path: &str, body: Value) {
    let req = http::Request::patch(path)
        .header("content-type", "application/merge-patch+json")
        .body(serde_json::to_vec(&body).unwrap())
        .unwrap();
    client.request::<Value>(req).await.unwrap();
}

async fn delete(client: &kube::Client, path: &str) {
    let req = http::Request::delete(path).body(Vec::new()).unwrap();
    client.request::<Value>(req).await.unwrap();
}

fn gateway(replicas: i32, origins: &[&str]) -> Value {
    json!({
        "apiVersion": CRD_API, "kind": "RealtimeGateway",
        "metadata": {"name": "rt", "namespace": NS},
        "spec": {"region": "eu", "replicas": replicas, "allowedOrigins": origins,
                 "auth": {"hs256Secret": {"name": "auth", "key": "hs256"}}}
    })
}

fn policy(name: &str, tenant: &str, gateway: &str, patterns: &[&str]) -> Value {
    json!({
        "apiVersion": CRD_API, "kind": "TopicPolicy",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"gateway": gateway, "tenant": tenant,
                 "subscribe": patterns.iter().map(|p| json!({"pattern": p})).collect::<Vec<_>>()}
    })
}

/// A fake API server that authorizes with the RBAC the chart renders, and
/// the operator's ServiceAccount from the same render.
fn fake_with_chart_rbac() -> (FakeApi, User) {
    let chart = RenderedChart::render(NS, &json!({}));
    (FakeApi::with_rbac(chart.rbac()), chart.operator_account())
}

/// Fails with every request the chart's RBAC denied the operator.
fn assert_nothing_denied(fake: &FakeApi) {
    let denied = fake.denied();
    assert!(
        denied.is_empty(),
        "the chart's RBAC denied the operator: {denied:#?}"
    );
}

fn config_hash(deploy: &Value) -> String {
    deploy["spec"]["template"]["metadata"]["annotations"]["switchboard.dev/config-hash"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test]
async fn reconciles_gateways_and_policies_end_to_end() {
    let (fake, operator) = fake_with_chart_rbac();
    // The test sets objects up as the cluster admin; the operator runs as
    // the chart's ServiceAccount.
    let client = fake.client();
    let operator_client = fake.client_as(operator.clone());
    let metrics = Arc::new(Metrics::default());
    let ctx = Arc::new(Context {
        client: operator_client.clone(),
        recorder: Recorder::new(
            operator_client.clone(),
            Reporter {
                controller: "switchboard-operator".into(),
                instance: None,
            },
        ),
        metrics: metrics.clone(),
        default_image: "gateway:test".into(),
        resync: controller::RESYNC,
        watch_namespace: None,
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(controller::run(ctx, async move {
        let _ = stop_rx.await;
    }));

    // create → reconcile
    create(
        &client,
        CRD_API,
        "realtimegateways",
        gateway(3, &["https://a.example"]),
    )
    .await;
    create(
        &client,
        CRD_API,
        "topicpolicies",
        policy("acme", "acme", "rt", &["deal.*"]),
    )
    .await;
    create(
        &client,
        CRD_API,
        "topicpolicies",
        policy("acme-again", "acme", "rt", &["contact.*"]),
    )
    .await;
    create(
        &client,
        CRD_API,
        "topicpolicies",
        // Admitted by the CRD's pattern, refused by the gateway's grammar
        // (at most 16 tokens).
        policy(
            "broken",
            "globex",
            "rt",
            &["a.b.c.d.e.f.g.h.i.j.k.l.m.n.o.p.q"],
        ),
    )
    .await;
    create(
        &client,
        CRD_API,
        "topicpolicies",
        policy("orphan", "initech", "nope", &["x"]),
    )
    .await;

    // Admitted by the CRD, refused by the gateway's own config checks.
    create(
        &client,
        CRD_API,
        "realtimegateways",
        json!({"apiVersion": CRD_API, "kind": "RealtimeGateway", "metadata": {"name": "bad"},
               "spec": {"region": "eu", "replicas": 1, "auth": {"jwksUrl": "https://id.example.com/jwks.json"},
                        "nats": {"urls": ["nats://n:4222"], "regions": ["us"]}}}),
    )
    .await;
    let deploy = eventually("deployment", || {
        fake.get("apps/v1", "deployments", NS, "rt")
    })
    .await;
    let bad = eventually("the invalid gateway's conditions", || {
        let gw = fake.get(CRD_API, "realtimegateways", NS, "bad")?;
        let c = condition(&gw, "Degraded")?;
        (c["reason"] == "InvalidSpec").then(|| c.clone())
    })
    .await;
    assert!(
        bad["message"]
            .as_str()
            .unwrap()
            .contains("must include this gateway's region"),
        "{bad}"
    );
    assert_eq!(fake.get("apps/v1", "deployments", NS, "bad"), None);
    for (api, plural, name) in [
        ("v1", "configmaps", "rt-config"),
        ("v1", "services", "rt"),
        ("v1", "serviceaccounts", "rt"),
        ("policy/v1", "poddisruptionbudgets", "rt"),
    ] {
        let obj = eventually(plural, || fake.get(api, plural, NS, name)).await;
        assert_eq!(
            obj["metadata"]["ownerReferences"][0]["name"], "rt",
            "{plural} owned by the gateway"
        );
    }
    assert_eq!(fake.count("autoscaling/v2", "horizontalpodautoscalers"), 0);
    assert_eq!(deploy["spec"]["replicas"], 3);

    // Policy verdicts.
    let accepted = |name: &str| {
        let p = fake.get(CRD_API, "topicpolicies", NS, name)?;
        let c = condition(&p, "Accepted")?;
        Some((
            c["status"].as_str()?.to_owned(),
            c["reason"].as_str()?.to_owned(),
        ))
    };
    assert_eq!(
        eventually("acme accepted", || accepted("acme")).await,
        ("True".into(), "Accepted".into())
    );
    assert_eq!(
        eventually("conflict", || accepted("acme-again")).await,
        ("False".into(), "Conflict".into())
    );
    assert_eq!(
        eventually("invalid", || accepted("broken")).await,
        ("False".into(), "InvalidPattern".into())
    );
    assert_eq!(
        eventually("orphan", || accepted("orphan")).await,
        ("False".into(), "GatewayNotFound".into())
    );

    // Play the Deployment controller: the pods become ready.
    let d = fake.get("apps/v1", "deployments", NS, "rt").unwrap();
    let generation = d["metadata"]["generation"].clone();
    merge_patch(
        &client,
        &format!("/apis/apps/v1/namespaces/{NS}/deployments/rt/status"),
        json!({"status": {"observedGeneration": generation, "replicas": 3, "readyReplicas": 3, "updatedReplicas": 3}}),
    )
    .await;
    let gw = eventually("gateway Ready", || {
        let gw = fake.get(CRD_API, "realtimegateways", NS, "rt")?;
        (condition(&gw, "Ready")?["status"] == "True").then_some(gw)
    })
    .await;
    assert_eq!(gw["status"]["readyReplicas"], 3);
    assert_eq!(gw["status"]["policiesApplied"], 1);
    assert_eq!(
        condition(&gw, "Degraded").unwrap()["status"],
        "True",
        "rejected policies degrade the gateway"
    );
    assert_eq!(
        gw["status"]["selector"],
        "app.kubernetes.io/instance=rt,app.kubernetes.io/name=switchboard-gateway"
    );
    let cm = fake.get("v1", "configmaps", NS, "rt-config").unwrap();
    let bundle =
        switchboard_config::PolicyBundle::from_yaml(cm["data"]["policy.yaml"].as_str().unwrap())
            .unwrap();
    assert_eq!(bundle.tenants.keys().collect::<Vec<_>>(), ["acme"]);
    let hash0 = config_hash(&deploy);

    // A policy edit updates the bundle without a rollout.
    merge_patch(
        &client,
        &format!("/apis/{CRD_API}/namespaces/{NS}/topicpolicies/acme"),
        json!({"spec": {"subscribe": [{"pattern": "deal.*"}, {"pattern": "timeline.*"}]}}),
    )
    .await;
    eventually("bundle updated", || {
        let cm = fake.get("v1", "configmaps", NS, "rt-config")?;
        cm["data"]["policy.yaml"]
            .as_str()?
            .contains("timeline.*")
            .then_some(())
    })
    .await;
    assert_eq!(
        config_hash(&fake.get("apps/v1", "deployments", NS, "rt").unwrap()),
        hash0,
        "no rollout for a policy change"
    );

    // A gateway edit rolls the pods.
    merge_patch(
        &client,
        &format!("/apis/{CRD_API}/namespaces/{NS}/realtimegateways/rt"),
        json!({"spec": {"allowedOrigins": ["https://b.example"]}}),
    )
    .await;
    eventually("config hash changed", || {
        let d = fake.get("apps/v1", "deployments", NS, "rt")?;
        (config_hash(&d) != hash0).then_some(())
    })
    .await;

    // Drift is corrected: someone scales the Deployment by hand.
    merge_patch(
        &client,
        &format!("/apis/apps/v1/namespaces/{NS}/deployments/rt"),
        json!({"spec": {"replicas": 7}}),
    )
    .await;
    eventually("drift corrected", || {
        let d = fake.get("apps/v1", "deployments", NS, "rt")?;
        (d["spec"]["replicas"] == 3).then_some(())
    })
    .await;

    // Autoscaling on: an HPA appears and the Deployment leaves replicas to it.
    merge_patch(
        &client,
        &format!("/apis/{CRD_API}/namespaces/{NS}/realtimegateways/rt"),
        json!({"spec": {"replicas": null, "autoscaling": {"minReplicas": 2, "maxReplicas": 6},
                        "resources": {"requests": {"cpu": "500m"}}}}),
    )
    .await;
    let hpa = eventually("hpa", || {
        fake.get("autoscaling/v2", "horizontalpodautoscalers", NS, "rt")
    })
    .await;
    assert_eq!(hpa["spec"]["maxReplicas"], 6);
    assert_eq!(
        hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"], 70,
        "CPU by default"
    );

    // Deleting the winning policy lets nobody claim acme until the
    // conflicting one is judged again: it is accepted now.
    delete(
        &client,
        &format!("/apis/{CRD_API}/namespaces/{NS}/topicpolicies/acme"),
    )
    .await;
    assert_eq!(
        eventually("re-judged", || accepted("acme-again")
            .filter(|a| a.0 == "True"))
        .await
        .1,
        "Accepted"
    );
    eventually("bundle follows", || {
        let cm = fake.get("v1", "configmaps", NS, "rt-config")?;
        cm["data"]["policy.yaml"]
            .as_str()?
            .contains("contact.*")
            .then_some(())
    })
    .await;

    // Retargeting a policy to another gateway removes it from this one at
    // once (not at the next resync, 5 minutes away in this test).
    merge_patch(
        &client,
        &format!("/apis/{CRD_API}/namespaces/{NS}/topicpolicies/acme-again"),
        json!({"spec": {"gateway": "somewhere-else"}}),
    )
    .await;
    eventually("the old gateway's bundle drops the policy", || {
        let cm = fake.get("v1", "configmaps", NS, "rt-config")?;
        (!cm["data"]["policy.yaml"].as_str()?.contains("contact.*")).then_some(())
    })
    .await;

    // Deleting the gateway removes everything it owns (garbage collection
    // through the owner references the operator set).
    delete(
        &client,
        &format!("/apis/{CRD_API}/namespaces/{NS}/realtimegateways/rt"),
    )
    .await;
    eventually("owned objects gone", || {
        (fake.count("apps/v1", "deployments") == 0 && fake.count("v1", "configmaps") == 0)
            .then_some(())
    })
    .await;

    let m = metrics.render(switchboard_operator::metrics::ExpositionFormat::PrometheusText);
    assert!(
        m.contains("switchboard_operator_reconciles_total{kind=\"RealtimeGateway\"}"),
        "{m}"
    );
    // Every rejection a user can cause is a Warning Event on the object,
    // with the condition's reason.
    for (kind, name, reason) in [
        ("TopicPolicy", "acme-again", "Conflict"),
        ("TopicPolicy", "broken", "InvalidPattern"),
        ("TopicPolicy", "orphan", "GatewayNotFound"),
        ("RealtimeGateway", "bad", "InvalidSpec"),
    ] {
        let events = fake.list("events.k8s.io/v1", "events");
        assert!(
            events.iter().any(|e| e["reason"] == reason
                && e["type"] == "Warning"
                && e["regarding"]["kind"] == kind
                && e["regarding"]["name"] == name),
            "no {reason} Event on {kind} {name}: {events:#?}"
        );
    }
    let _ = stop_tx.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), running).await;
    assert_nothing_denied(&fake);
    assert_owned_watches_select_the_label(&fake, &operator);
}

/// Run the controllers as `operator` until the returned sender fires.
fn start_operator(
    fake: &FakeApi,
    operator: User,
    watch_namespace: Option<String>,
) -> (
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let client = fake.client_as(operator);
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(
            client,
            Reporter {
                controller: "switchboard-operator".into(),
                instance: None,
            },
        ),
        metrics: Arc::new(Metrics::default()),
        default_image: "gateway:test".into(),
        // Secrets are read at each reconcile, not watched.
        resync: Duration::from_millis(300),
        watch_namespace,
    });
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let running = tokio::spawn(controller::run(ctx, async move {
        let _ = stop_rx.await;
    }));
    (stop_tx, running)
}

/// Every list and watch `operator` made of a kind it owns selected the
/// operator's label (it caches its own objects, not the cluster's).
fn assert_owned_watches_select_the_label(fake: &FakeApi, operator: &User) {
    const OWNED: [&str; 6] = [
        "deployments",
        "configmaps",
        "services",
        "serviceaccounts",
        "poddisruptionbudgets",
        "horizontalpodautoscalers",
    ];
    let seen: Vec<_> = fake
        .list_selectors(operator)
        .into_iter()
        .filter(|(_, resource, _)| OWNED.contains(&resource.as_str()))
        .collect();
    for kind in OWNED {
        assert!(
            seen.iter().any(|(verb, r, _)| r == kind && verb == "watch"),
            "the operator watches {kind}: {seen:?}"
        );
    }
    for (verb, resource, selector) in &seen {
        assert_eq!(
            selector.as_deref(),
            Some(controller::MANAGED_BY),
            "{verb} {resource} without the operator's label selector"
        );
    }
}

#[tokio::test]
async fn in_namespace_scope_the_operator_needs_no_cluster_wide_rights() {
    let chart = RenderedChart::render(NS, &json!({"operator": {"scope": "namespace"}}));
    let kinds: Vec<&str> = chart
        .objects
        .iter()
        .filter_map(|o| o["kind"].as_str())
        .collect();
    assert!(
        !kinds.iter().any(|k| k.starts_with("Cluster")),
        "namespace scope renders no cluster-wide RBAC: {kinds:?}"
    );
    let watch = chart.watch_namespace();
    assert_eq!(watch.as_deref(), Some(NS));
    let fake = FakeApi::with_rbac(chart.rbac());
    let operator = chart.operator_account();
    let client = fake.client();
    // Another team's gateway, in another namespace, is not this operator's.
    create_in(
        &client,
        "elsewhere",
        CRD_API,
        "realtimegateways",
        gateway(1, &[]),
    )
    .await;
    let (stop, running) = start_operator(&fake, operator.clone(), watch);
    create(&client, CRD_API, "realtimegateways", gateway(2, &[])).await;
    create(
        &client,
        CRD_API,
        "topicpolicies",
        policy("acme", "acme", "rt", &["deal.*"]),
    )
    .await;
    eventually("the gateway in the release namespace is reconciled", || {
        let gw = fake.get(CRD_API, "realtimegateways", NS, "rt")?;
        (gw["status"]["policiesApplied"] == 1).then_some(())
    })
    .await;
    assert!(fake.get("apps/v1", "deployments", NS, "rt").is_some());
    assert_eq!(
        fake.get("apps/v1", "deployments", "elsewhere", "rt"),
        None,
        "the other namespace is left alone"
    );
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), running).await;
    // Nothing denied: the operator never tried to read across namespaces.
    assert_nothing_denied(&fake);
    assert_owned_watches_select_the_label(&fake, &operator);
}

fn secrets_hash(deploy: &Value) -> Option<String> {
    deploy["spec"]["template"]["metadata"]["annotations"]["switchboard.dev/secrets-hash"]
        .as_str()
        .map(str::to_owned)
}

#[tokio::test]
async fn a_changed_secret_rolls_the_pods_and_a_missing_one_is_reported() {
    use k8s_openapi::api::events::v1::Event;
    let (fake, operator) = fake_with_chart_rbac();
    let client = fake.client();
    let (stop, running) = start_operator(&fake, operator, None);
    // The gateway mounts Secret "auth" key "hs256", which does not exist yet.
    create(&client, CRD_API, "realtimegateways", gateway(2, &[])).await;
    let missing = eventually("a Deployment stamped with the Secrets' hash", || {
        fake.get("apps/v1", "deployments", NS, "rt")
            .and_then(|d| secrets_hash(&d))
    })
    .await;
    let events: kube::Api<Event> = kube::Api::namespaced(client.clone(), NS);
    let mut reported = false;
    for _ in 0..100 {
        let list = events.list(&Default::default()).await.unwrap();
        if list
            .items
            .iter()
            .any(|e| e.reason.as_deref() == Some("SecretNotFound"))
        {
            reported = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reported, "a missing Secret is a Warning Event");

    let secret = |value: &str| {
        json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "auth", "namespace": NS},
               "data": {"hs256": base64(value)}})
    };
    create(&client, "v1", "secrets", secret("first key")).await;
    let first = eventually("the pods roll when the Secret appears", || {
        fake.get("apps/v1", "deployments", NS, "rt")
            .and_then(|d| secrets_hash(&d))
            .filter(|h| *h != missing)
    })
    .await;
    let config = config_hash(&fake.get("apps/v1", "deployments", NS, "rt").unwrap());
    merge_patch(
        &client,
        &format!("/api/v1/namespaces/{NS}/secrets/auth"),
        json!({"data": {"hs256": base64("rotated key")}}),
    )
    .await;
    let rotated = eventually("the pods roll when the key changes", || {
        fake.get("apps/v1", "deployments", NS, "rt")
            .and_then(|d| secrets_hash(&d))
            .filter(|h| *h != first)
    })
    .await;
    assert_ne!(rotated, missing);
    let deploy = fake.get("apps/v1", "deployments", NS, "rt").unwrap();
    assert_eq!(config_hash(&deploy), config, "only the Secrets changed");
    // Another key of the same Secret does not roll anything.
    merge_patch(
        &client,
        &format!("/api/v1/namespaces/{NS}/secrets/auth"),
        json!({"data": {"unrelated": base64("x")}}),
    )
    .await;
    let reads = fake.requests("get", "secrets");
    eventually("two more reconciles", || {
        (fake.requests("get", "secrets") >= reads + 2).then_some(())
    })
    .await;
    let deploy = fake.get("apps/v1", "deployments", NS, "rt").unwrap();
    assert_eq!(secrets_hash(&deploy).as_deref(), Some(rotated.as_str()));
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), running).await;
    assert_nothing_denied(&fake);
}

/// A Secret data value, base64 as the API carries it.
fn base64(s: &str) -> Value {
    serde_json::to_value(k8s_openapi::ByteString(s.as_bytes().to_vec())).unwrap()
}

/// A gateway process playing one pod: the real binary, started with the
/// ConfigMap's config and its own copy of the mounted policy file.
struct GatewayPod {
    child: std::process::Child,
    dir: std::path::PathBuf,
    admin_port: u16,
}

impl GatewayPod {
    fn start(name: &str, config_map: &Value) -> Self {
        let bin = std::env::var_os("SWITCHBOARD_BIN")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| {
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/switchboard")
            });
        assert!(
            bin.exists(),
            "{} missing: cargo build --workspace first",
            bin.display()
        );
        let dir = std::env::temp_dir().join(format!("sb-pod-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("switchboard.yaml"),
            config_map["data"]["switchboard.yaml"].as_str().unwrap(),
        )
        .unwrap();
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let admin_port = free();
        let pod = Self {
            child: std::process::Command::new(bin)
                .arg("--config")
                .arg(dir.join("switchboard.yaml"))
                .args(["--listen", &format!("127.0.0.1:{}", free())])
                .args(["--admin-listen", &format!("127.0.0.1:{admin_port}")])
                .arg("--policy-file")
                .arg(dir.join("policy.yaml"))
                .env("RUST_LOG", "warn")
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
            dir,
            admin_port,
        };
        pod.mount(config_map);
        pod
    }

    /// What the kubelet does when the ConfigMap changes: update the file.
    fn mount(&self, config_map: &Value) {
        let tmp = self.dir.join(".policy.yaml");
        std::fs::write(&tmp, config_map["data"]["policy.yaml"].as_str().unwrap()).unwrap();
        std::fs::rename(&tmp, self.dir.join("policy.yaml")).unwrap();
    }
}

impl Drop for GatewayPod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn policy_rollout_is_reported_until_every_ready_pod_runs_the_new_bundle() {
    let (fake, operator) = fake_with_chart_rbac();
    let client = fake.client();
    let (stop, running) = start_operator(&fake, operator, None);
    create(
        &client,
        CRD_API,
        "realtimegateways",
        json!({"apiVersion": CRD_API, "kind": "RealtimeGateway", "metadata": {"name": "rt"},
               "spec": {"region": "eu", "replicas": 2,
                        "auth": {"jwksUrl": "https://id.example.com/jwks.json"}}}),
    )
    .await;
    create(
        &client,
        CRD_API,
        "topicpolicies",
        policy("acme", "acme", "rt", &["deal.*"]),
    )
    .await;
    let first = eventually("a bundle with acme", || {
        fake.get("v1", "configmaps", NS, "rt-config")
            .filter(|c| c.to_string().contains("deal.*"))
    })
    .await;
    let pods = [
        GatewayPod::start("a", &first),
        GatewayPod::start("b", &first),
    ];
    // The pods, as the kubelet reports them: two ready, one starting.
    for (name, port, ready) in [
        ("rt-a", pods[0].admin_port, true),
        ("rt-b", pods[1].admin_port, true),
        ("rt-c", 1, false),
    ] {
        create(
            &client,
            "v1",
            "pods",
            json!({"apiVersion": "v1", "kind": "Pod",
                   "metadata": {"name": name, "labels": {
                       "app.kubernetes.io/name": "switchboard-gateway",
                       "app.kubernetes.io/instance": "rt"}},
                   "spec": {"containers": [{"name": "gateway", "image": "gateway:test",
                       "ports": [{"name": "http", "containerPort": 8000},
                                 {"name": "admin", "containerPort": port}]}]}}),
        )
        .await;
        merge_patch(
            &client,
            &format!("/api/v1/namespaces/{NS}/pods/{name}/status"),
            json!({"status": {"podIP": "127.0.0.1", "conditions": [
                {"type": "Ready", "status": if ready { "True" } else { "False" }}]}}),
        )
        .await;
    }
    let applied = |kind: &str, name: &str| {
        let obj = fake.get(CRD_API, kind, NS, name)?;
        let c = condition(&obj, "PolicyApplied")?;
        Some((
            c["status"].as_str()?.to_owned(),
            c["reason"].as_str()?.to_owned(),
            c["message"].as_str()?.to_owned(),
        ))
    };
    let (_, _, message) = eventually("both ready pods run the bundle", || {
        applied("realtimegateways", "rt").filter(|a| a.0 == "True")
    })
    .await;
    assert!(
        message.starts_with("2/2 ready pods run policy bundle"),
        "{message}"
    );
    eventually("acme reports it applied", || {
        applied("topicpolicies", "acme").filter(|a| a.0 == "True")
    })
    .await;

    // A new tenant: the ConfigMap changes before any pod has the new file.
    create(
        &client,
        CRD_API,
        "topicpolicies",
        policy("globex", "globex", "rt", &["ticket.*"]),
    )
    .await;
    let second = eventually("a bundle with globex", || {
        fake.get("v1", "configmaps", NS, "rt-config")
            .filter(|c| c.to_string().contains("ticket.*"))
    })
    .await;
    let lag = eventually("both pods lag", || {
        applied("realtimegateways", "rt").filter(|a| a.1 == "PodsLagging")
    })
    .await;
    assert_eq!(lag.0, "False");
    assert!(lag.2.starts_with("2 of 2 ready pods"), "{}", lag.2);
    eventually("globex waits for the pods", || {
        applied("topicpolicies", "globex").filter(|a| a.1 == "PodsLagging")
    })
    .await;
    pods[0].mount(&second);
    eventually("one pod left", || {
        applied("realtimegateways", "rt").filter(|a| a.2.starts_with("1 of 2 ready pods"))
    })
    .await;
    pods[1].mount(&second);
    eventually("every ready pod runs the new bundle", || {
        applied("realtimegateways", "rt").filter(|a| a.0 == "True")
    })
    .await;
    eventually("globex applied", || {
        applied("topicpolicies", "globex").filter(|a| a.0 == "True")
    })
    .await;
    let _ = stop.send(());
    let _ = tokio::time::timeout(Duration::from_secs(10), running).await;
    assert_nothing_denied(&fake);
}
