//! The controller scenario against a real cluster (kind, k3d, …): built only
//! with `--features real-cluster`, run with `KUBECONFIG` pointing at a
//! disposable cluster. See docs/operator.md. Not part of CI: no cluster can
//! run on the CI machines; `controller.rs` runs the scenario against the
//! in-process fake API instead.
#![cfg(feature = "real-cluster")]

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
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
    let ctx = Arc::new(Context {
        client: client.clone(),
        recorder: Recorder::new(
            client.clone(),
            Reporter {
                controller: "switchboard-operator-test".into(),
                instance: None,
            },
        ),
        metrics: Arc::new(Metrics::default()),
        default_image: std::env::var("SWITCHBOARD_GATEWAY_IMAGE")
            .unwrap_or_else(|_| "ghcr.io/switchboard-dev/gateway:0.1.0".into()),
        resync: controller::RESYNC,
        watch_namespace: None,
    });
    let running = tokio::spawn(controller::run(ctx, std::future::pending()));
    let gws: Api<RealtimeGateway> = Api::namespaced(client.clone(), &ns);
    let pols: Api<TopicPolicy> = Api::namespaced(client.clone(), &ns);
    gws.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "apiVersion": "switchboard.dev/v1alpha1", "kind": "RealtimeGateway",
            "metadata": {"name": "rt"}, "spec": {"region": "test", "replicas": 1}
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
    namespaces
        .delete(&ns, &DeleteParams::default())
        .await
        .unwrap();
}
