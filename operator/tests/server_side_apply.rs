//! The fake API server's server-side apply keeps field ownership as the API
//! server does, so the controller tests see what a real cluster does when
//! the operator stops applying a field.

mod fake_api;

use fake_api::FakeApi;
use fake_api::fields::owned_by;
use k8s_openapi::api::apps::v1::Deployment;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

fn deployment(spec: Value) -> Value {
    let mut spec = spec;
    spec["selector"] = json!({"matchLabels": {"a": "b"}});
    spec["template"] = json!({"metadata": {"labels": {"a": "b"}}, "spec": {"containers": [{"name": "c", "image": "i"}]}});
    json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": spec})
}

async fn apply(
    api: &Api<Deployment>,
    manager: &str,
    force: bool,
    body: Value,
) -> Result<Value, u16> {
    let mut params = PatchParams::apply(manager);
    if force {
        params = params.force();
    }
    match api.patch("d", &params, &Patch::Apply(&body)).await {
        Ok(d) => Ok(serde_json::to_value(d).unwrap()),
        Err(kube::Error::Api(s)) => Err(s.code),
        Err(e) => panic!("{e}"),
    }
}

fn replicas() -> Vec<String> {
    vec!["spec".into(), "replicas".into()]
}

#[tokio::test]
async fn a_field_its_only_manager_stops_applying_is_removed_and_defaulted() {
    let fake = FakeApi::new();
    let api: Api<Deployment> = Api::namespaced(fake.client(), "ns");
    let d = apply(&api, "a", false, deployment(json!({"replicas": 4})))
        .await
        .unwrap();
    assert_eq!(d["spec"]["replicas"], 4);
    assert!(owned_by(&d, "a").contains(&replicas()));
    let d = apply(&api, "a", false, deployment(json!({})))
        .await
        .unwrap();
    assert_eq!(d["spec"]["replicas"], 1, "removed, then defaulted to 1");
    assert!(!owned_by(&d, "a").contains(&replicas()));
}

#[tokio::test]
async fn a_field_another_manager_also_applies_stays() {
    let fake = FakeApi::new();
    let api: Api<Deployment> = Api::namespaced(fake.client(), "ns");
    apply(&api, "a", false, deployment(json!({"replicas": 4})))
        .await
        .unwrap();
    // Same value: shared ownership, no conflict.
    let partial = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": {"replicas": 4}});
    apply(&api, "b", false, partial).await.unwrap();
    let d = apply(&api, "a", false, deployment(json!({})))
        .await
        .unwrap();
    assert_eq!(d["spec"]["replicas"], 4);
    assert!(owned_by(&d, "b").contains(&replicas()));
}

#[tokio::test]
async fn applying_another_managers_value_conflicts_unless_forced() {
    let fake = FakeApi::new();
    let api: Api<Deployment> = Api::namespaced(fake.client(), "ns");
    apply(&api, "a", false, deployment(json!({"replicas": 4})))
        .await
        .unwrap();
    assert_eq!(
        apply(&api, "b", false, deployment(json!({"replicas": 5})))
            .await
            .err(),
        Some(409)
    );
    let d = apply(&api, "b", true, deployment(json!({"replicas": 5})))
        .await
        .unwrap();
    assert_eq!(d["spec"]["replicas"], 5);
    assert!(
        !owned_by(&d, "a").contains(&replicas()),
        "forcing takes the field"
    );
    // An update (not an apply) takes what it changes from everyone.
    let merge = Patch::Merge(json!({"spec": {"replicas": 6}}));
    let d = api
        .patch(
            "d",
            &PatchParams {
                field_manager: Some("hpa".into()),
                ..Default::default()
            },
            &merge,
        )
        .await
        .unwrap();
    let d = serde_json::to_value(d).unwrap();
    assert!(owned_by(&d, "hpa").contains(&replicas()));
    assert!(!owned_by(&d, "b").contains(&replicas()));
    // b stops applying replicas: hpa's value stays.
    let d = apply(&api, "b", false, deployment(json!({})))
        .await
        .unwrap();
    assert_eq!(d["spec"]["replicas"], 6);
}
