//! The operator binary, run as in a cluster (leader election, controllers)
//! against the fake API server over HTTP, scraped by a real Prometheus
//! (Debian's `prometheus`): the operator panels of the Grafana dashboard
//! return data, the series have the right types, `/metrics` negotiates its
//! format, and SIGTERM stops the operator cleanly (exit 0).

mod fake_api;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fake_api::FakeApi;
use serde_json::{Value, json};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn until<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn get_json(url: &str) -> Option<Value> {
    reqwest_get(url)
        .await
        .and_then(|t| serde_json::from_str(&t).ok())
}

async fn reqwest_get(url: &str) -> Option<String> {
    let r = reqwest::Client::new()
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    r.text().await.ok()
}

async fn query(prom: &str, promql: &str) -> Vec<Value> {
    let r = reqwest::Client::new()
        .get(format!("{prom}/api/v1/query"))
        .query(&[("query", promql)])
        .send()
        .await;
    let body: Value = match r {
        Ok(r) => r.json().await.unwrap_or(Value::Null),
        Err(_) => Value::Null,
    };
    body["data"]["result"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

#[tokio::test]
async fn prometheus_scrapes_the_operator_and_its_dashboard_panels_have_data() {
    // The operator binary authenticates as the chart's ServiceAccount and
    // is authorized with the chart's RBAC.
    let chart = fake_api::RenderedChart::render("switchboard", &serde_json::json!({}));
    let fake = FakeApi::with_rbac(chart.rbac());
    let token = FakeApi::token(&chart.operator_account());
    let addr = fake.serve().await;
    let client = fake.client();
    // The CRDs, as the chart installs them.
    let crds: kube::Api<
        k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
    > = kube::Api::all(client.clone());
    for doc in switchboard_operator::crd::crds_yaml().split("\n---") {
        if doc.trim().is_empty() {
            continue;
        }
        let crd = serde_saphyr::from_str(doc).unwrap();
        crds.create(&Default::default(), &crd).await.unwrap();
    }
    let dir =
        std::env::temp_dir().join(format!("sb-op-prom-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).unwrap();
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: switchboard\ncurrent-context: fake\nusers:\n- name: fake\n  user:\n    token: {token}\n"
        ),
    )
    .unwrap();
    let metrics_port = free_port();
    let mut operator = Proc(
        Command::new(env!("CARGO_BIN_EXE_switchboard-operator"))
            .args([
                "run",
                "--metrics-addr",
                &format!("127.0.0.1:{metrics_port}"),
            ])
            .env("KUBECONFIG", &kubeconfig)
            .env("POD_NAMESPACE", "switchboard")
            .env("POD_NAME", "operator-0")
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("operator.log")).unwrap())
            .spawn()
            .unwrap(),
    );
    let metrics_url = format!("http://127.0.0.1:{metrics_port}/metrics");
    until("the operator leads", async || {
        reqwest_get(&metrics_url)
            .await
            .filter(|m| m.contains("switchboard_operator_leader 1"))
    })
    .await;
    // Something to reconcile.
    let gateways: kube::Api<switchboard_operator::crd::RealtimeGateway> =
        kube::Api::namespaced(client.clone(), "switchboard");
    let gw = serde_json::from_value(json!({
        "apiVersion": "switchboard.dev/v1alpha1", "kind": "RealtimeGateway",
        "metadata": {"name": "rt", "namespace": "switchboard"},
        "spec": {"region": "eu", "replicas": 2, "auth": {"jwksUrl": "https://id.example.com/jwks.json"}}
    }))
    .unwrap();
    gateways.create(&Default::default(), &gw).await.unwrap();
    until("a reconcile", async || {
        fake.get("apps/v1", "deployments", "switchboard", "rt")
    })
    .await;
    assert_eq!(
        fake.denied(),
        vec![],
        "the chart's RBAC denied the operator"
    );

    // Prometheus text for plain scrapers, OpenMetrics for Prometheus.
    let text = reqwest_get(&metrics_url).await.unwrap();
    assert!(text.contains("# TYPE switchboard_operator_reconciles_total counter\n"));
    assert!(
        text.contains("switchboard_operator_reconcile_failures_total{kind=\"TopicPolicy\"} 0\n")
    );
    let promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian's prometheus package)");
    {
        use std::io::Write;
        promtool
            .stdin
            .as_ref()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
    }
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success() && checked.stdout.is_empty() && checked.stderr.is_empty(),
        "promtool: {}{}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );

    let prom_port = free_port();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global: {{scrape_interval: 1s}}\nscrape_configs:\n- job_name: switchboard-operator\n  static_configs:\n  - targets: ['127.0.0.1:{metrics_port}']\n    labels: {{pod: operator-0}}\n"
        ),
    )
    .unwrap();
    let _prometheus = Proc(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("prometheus.log")).unwrap())
            .spawn()
            .expect("prometheus (Debian's prometheus package)"),
    );
    let prom = format!("http://127.0.0.1:{prom_port}");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("deploy/observability/grafana-dashboard.json"))
            .unwrap(),
    )
    .unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().cloned().unwrap_or_default())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .filter(|e| e.contains("switchboard_operator_"))
        .collect();
    assert!(!exprs.is_empty());
    for expr in &exprs {
        until(&format!("data for {expr}"), async || {
            let r = query(&prom, expr).await;
            (!r.is_empty()).then_some(())
        })
        .await;
    }
    let leader = query(&prom, "max(switchboard_operator_leader)").await;
    assert_eq!(leader[0]["value"][1], "1");
    let meta = until("metadata", async || {
        let m = get_json(&format!("{prom}/api/v1/metadata")).await?;
        m["data"]
            .get("switchboard_operator_reconcile_duration_seconds")
            .is_some()
            .then_some(m)
    })
    .await;
    for (name, kind) in [
        ("switchboard_operator_reconciles", "counter"),
        ("switchboard_operator_reconcile_failures", "counter"),
        (
            "switchboard_operator_reconcile_duration_seconds",
            "histogram",
        ),
        ("switchboard_operator_leader", "gauge"),
    ] {
        assert_eq!(meta["data"][name][0]["type"], kind, "{name}");
    }

    // SIGTERM: the controllers stop, the lease is released (another replica
    // leads at once) and the process exits 0.
    let holder = |fake: &FakeApi| {
        fake.get(
            "coordination.k8s.io/v1",
            "leases",
            "switchboard",
            "switchboard-operator",
        )
        .map(|l| l["spec"]["holderIdentity"].clone())
    };
    assert_eq!(holder(&fake), Some(json!("operator-0")));
    let pid = operator.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let status = until("the operator exits", async || {
        operator.0.try_wait().unwrap()
    })
    .await;
    assert!(
        status.success(),
        "{status:?}: {}",
        std::fs::read_to_string(dir.join("operator.log")).unwrap_or_default()
    );
    assert_eq!(holder(&fake), Some(Value::Null), "the lease is released");
    let _ = std::fs::remove_dir_all(&dir);
}
