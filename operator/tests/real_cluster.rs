//! The controller scenario against a real cluster (kind, k3d, …): built only
//! with `--features real-cluster`, run with `KUBECONFIG` pointing at a
//! disposable cluster. See docs/operator.md. Not part of CI: no cluster can
//! run on the CI machines; `controller.rs` runs the scenario against the
//! in-process fake API instead.
//!
//! By default the controllers run as the chart's ServiceAccount: the test
//! renders the chart (real Helm engine, the test venv's Python), applies its
//! ServiceAccount and RBAC to the cluster and impersonates the account, so
//! the cluster's own authorizer judges every request the operator makes.
//! `SWITCHBOARD_REAL_CLUSTER_AS=admin` runs them with the kubeconfig's
//! identity instead; `SWITCHBOARD_REAL_CLUSTER_SCOPE=namespace` renders the
//! chart's namespace scope (Roles only).
#![cfg(feature = "real-cluster")]

mod fake_api;

use std::sync::Arc;
use std::time::Duration;

use fake_api::RenderedChart;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::discovery::ApiResource;
use kube::runtime::events::{Recorder, Reporter};
use kube::{Api, CustomResourceExt};
use serde_json::json;
use switchboard_operator::controller::{self, Context, MANAGER};
use switchboard_operator::crd::{RealtimeGateway, TopicPolicy};
use switchboard_operator::metrics::Metrics;

async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    mut f: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn reconciles_against_a_real_cluster() {
    let client = kube::Client::try_default()
        .await
        .expect("a cluster in KUBECONFIG");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in [RealtimeGateway::crd(), TopicPolicy::crd()] {
        let name = crd.metadata.name.clone().unwrap();
        crds.patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap();
    }
    let ns = format!("switchboard-test-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap(),
        )
        .await
        .unwrap();
    let (operator, watch_namespace, cluster_rbac) = operator_client(&client, &ns).await;
    let ctx = Arc::new(Context {
        client: operator.clone(),
        recorder: Recorder::new(
            operator.clone(),
            Reporter {
                controller: "switchboard-operator-test".into(),
                instance: None,
            },
        ),
        metrics: Arc::new(Metrics::default()),
        default_image: std::env::var("SWITCHBOARD_GATEWAY_IMAGE")
            .unwrap_or_else(|_| "ghcr.io/switchboard-dev/gateway:0.1.0".into()),
        resync: controller::RESYNC,
        watch_namespace,
    });
    let running = tokio::spawn(controller::run(ctx, std::future::pending()));
    let gws: Api<RealtimeGateway> = Api::namespaced(client.clone(), &ns);
    let pols: Api<TopicPolicy> = Api::namespaced(client.clone(), &ns);
    gws.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "apiVersion": "switchboard.dev/v1alpha1", "kind": "RealtimeGateway",
            "metadata": {"name": "rt"},
            "spec": {"region": "test", "replicas": 1, "auth": {"jwksUrl": "https://id.example.com/jwks.json"}}
        }))
        .unwrap(),
    )
    .await
    .unwrap();
    pols.create(&PostParams::default(), &serde_json::from_value(json!({
        "apiVersion": "switchboard.dev/v1alpha1", "kind": "TopicPolicy",
        "metadata": {"name": "acme"}, "spec": {"gateway": "rt", "tenant": "acme", "subscribe": [{"pattern": "deal.*"}]}
    })).unwrap()).await.unwrap();
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    eventually("deployment", || async {
        deployments.get_opt("rt").await.ok().flatten()
    })
    .await;
    eventually("bundle with acme", || async {
        let cm = cms.get_opt("rt-config").await.ok().flatten()?;
        cm.data?.get("policy.yaml")?.contains("acme").then_some(())
    })
    .await;
    eventually("policy accepted", || async {
        let p = pols.get("acme").await.ok()?;
        p.status?
            .conditions
            .iter()
            .any(|c| c.type_ == "Accepted" && c.status == "True")
            .then_some(())
    })
    .await;
    running.abort();
    for (resource, name) in cluster_rbac {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        let _ = api.delete(&name, &DeleteParams::default()).await;
    }
    namespaces
        .delete(&ns, &DeleteParams::default())
        .await
        .unwrap();
}

/// The client the controllers use: the chart's ServiceAccount (impersonated,
/// its RBAC applied from the rendered chart) unless
/// `SWITCHBOARD_REAL_CLUSTER_AS=admin`. Returns the cluster-scoped RBAC
/// objects it created, for clean-up.
async fn operator_client(
    admin: &kube::Client,
    ns: &str,
) -> (kube::Client, Option<String>, Vec<(ApiResource, String)>) {
    if std::env::var("SWITCHBOARD_REAL_CLUSTER_AS").as_deref() == Ok("admin") {
        return (admin.clone(), None, Vec::new());
    }
    let scope =
        std::env::var("SWITCHBOARD_REAL_CLUSTER_SCOPE").unwrap_or_else(|_| "cluster".into());
    // A release name per namespace keeps cluster-wide names apart.
    let chart = RenderedChart::render(ns, &json!({"operator": {"scope": scope}}));
    let rbac = |kind: &str| -> Option<(ApiResource, bool)> {
        let (group, version, plural, namespaced) = match kind {
            "ServiceAccount" => ("", "v1", "serviceaccounts", true),
            "Role" => ("rbac.authorization.k8s.io", "v1", "roles", true),
            "RoleBinding" => ("rbac.authorization.k8s.io", "v1", "rolebindings", true),
            "ClusterRole" => ("rbac.authorization.k8s.io", "v1", "clusterroles", false),
            "ClusterRoleBinding" => (
                "rbac.authorization.k8s.io",
                "v1",
                "clusterrolebindings",
                false,
            ),
            _ => return None,
        };
        let api_version = if group.is_empty() {
            version.to_owned()
        } else {
            format!("{group}/{version}")
        };
        Some((
            ApiResource {
                group: group.into(),
                version: version.into(),
                api_version,
                kind: kind.into(),
                plural: plural.into(),
            },
            namespaced,
        ))
    };
    let mut cluster_scoped = Vec::new();
    for obj in &chart.objects {
        let Some((resource, namespaced)) = obj["kind"].as_str().and_then(rbac) else {
            continue;
        };
        let mut obj: DynamicObject = serde_json::from_value(obj.clone()).unwrap();
        let name = obj.metadata.name.clone().unwrap();
        let api: Api<DynamicObject> = if namespaced {
            Api::namespaced_with(admin.clone(), ns, &resource)
        } else {
            // Cluster-wide names carry the namespace, so runs do not collide.
            let unique = format!("{name}-{ns}");
            obj.metadata.name = Some(unique.clone());
            cluster_scoped.push((resource.clone(), unique));
            Api::all_with(admin.clone(), &resource)
        };
        if obj
            .types
            .as_ref()
            .is_some_and(|t| t.kind == "ClusterRoleBinding")
        {
            obj.data["roleRef"]["name"] = json!(format!(
                "{}-{ns}",
                obj.data["roleRef"]["name"].as_str().unwrap()
            ));
        }
        let name = obj.metadata.name.clone().unwrap();
        api.patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&obj),
        )
        .await
        .unwrap();
    }
    let account = chart.operator_account();
    let mut config = kube::Config::infer()
        .await
        .expect("a cluster in KUBECONFIG");
    config.auth_info.impersonate = Some(account.username());
    (
        kube::Client::try_from(config).unwrap(),
        chart.watch_namespace(),
        cluster_scoped,
    )
}
