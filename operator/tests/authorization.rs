//! The fake API server's authorizer behaves as the API server's RBAC does,
//! so that the controller tests, which run under the chart's RBAC, fail
//! where a real cluster would refuse the operator.

mod fake_api;

use fake_api::{FakeApi, Rbac, User};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use serde_json::{Value, json};

fn account() -> User {
    User::ServiceAccount {
        namespace: "ops".into(),
        name: "op".into(),
    }
}

/// A Role in `ns` with `rules`, bound to the `ops/op` ServiceAccount.
fn role(ns: &str, rules: Value) -> Vec<Value> {
    vec![
        json!({"kind": "Role", "apiVersion": "rbac.authorization.k8s.io/v1",
               "metadata": {"name": "r", "namespace": ns}, "rules": rules}),
        json!({"kind": "RoleBinding", "apiVersion": "rbac.authorization.k8s.io/v1",
               "metadata": {"name": "r", "namespace": ns},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "r"},
               "subjects": [{"kind": "ServiceAccount", "name": "op", "namespace": "ops"}]}),
    ]
}

fn config_map(name: &str) -> ConfigMap {
    serde_json::from_value(json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": name}, "data": {"k": "v"}}))
    .unwrap()
}

fn code(r: Result<impl Sized, kube::Error>) -> u16 {
    match r {
        Ok(_) => 200,
        Err(kube::Error::Api(s)) => s.code,
        Err(e) => panic!("unexpected error {e}"),
    }
}

#[tokio::test]
async fn an_apply_that_creates_needs_create_and_one_that_updates_needs_patch() {
    let fake = FakeApi::with_rbac(Rbac::from_objects(&role(
        "app",
        json!([{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "patch"]}]),
    )));
    let op: Api<ConfigMap> = Api::namespaced(fake.client_as(account()), "app");
    let admin: Api<ConfigMap> = Api::namespaced(fake.client(), "app");
    let ssa = PatchParams::apply("test");
    assert_eq!(
        code(op.patch("a", &ssa, &Patch::Apply(config_map("a"))).await),
        403
    );
    let denied = fake.denied();
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(denied[0].1.verb, "create");
    // Once the object exists, the same apply is a patch.
    admin
        .create(&Default::default(), &config_map("a"))
        .await
        .unwrap();
    assert_eq!(
        code(op.patch("a", &ssa, &Patch::Apply(config_map("a"))).await),
        200
    );
    assert_eq!(code(op.get("a").await), 200);
    assert_eq!(
        code(op.list(&ListParams::default()).await),
        403,
        "list is not get"
    );
    assert_eq!(code(op.delete("a", &Default::default()).await), 403);
}

#[tokio::test]
async fn a_role_grants_in_its_namespace_only_and_a_cluster_role_binding_everywhere() {
    let rules = json!([{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["*"]}]);
    let fake = FakeApi::with_rbac(Rbac::from_objects(&role("app", rules.clone())));
    let client = fake.client_as(account());
    let here: Api<ConfigMap> = Api::namespaced(client.clone(), "app");
    let there: Api<ConfigMap> = Api::namespaced(client.clone(), "other");
    assert_eq!(
        code(here.create(&Default::default(), &config_map("a")).await),
        200
    );
    assert_eq!(
        code(there.create(&Default::default(), &config_map("a")).await),
        403
    );
    assert_eq!(
        code(
            Api::<ConfigMap>::all(client)
                .list(&Default::default())
                .await
        ),
        403
    );

    let cluster = vec![
        json!({"kind": "ClusterRole", "metadata": {"name": "c"}, "rules": rules}),
        json!({"kind": "ClusterRoleBinding", "metadata": {"name": "c"},
               "roleRef": {"kind": "ClusterRole", "name": "c"},
               "subjects": [{"kind": "ServiceAccount", "name": "op", "namespace": "ops"}]}),
    ];
    let fake = FakeApi::with_rbac(Rbac::from_objects(&cluster));
    let all: Api<ConfigMap> = Api::all(fake.client_as(account()));
    assert_eq!(code(all.list(&Default::default()).await), 200);
    // Another ServiceAccount of the same name elsewhere is someone else.
    let stranger = User::ServiceAccount {
        namespace: "elsewhere".into(),
        name: "op".into(),
    };
    let all: Api<ConfigMap> = Api::all(fake.client_as(stranger));
    assert_eq!(code(all.list(&Default::default()).await), 403);
}

#[tokio::test]
async fn the_status_subresource_is_its_own_resource() {
    use k8s_openapi::api::apps::v1::Deployment;
    let fake = FakeApi::with_rbac(Rbac::from_objects(&role(
        "app",
        json!([{"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["get", "patch"]}]),
    )));
    let admin: Api<Deployment> = Api::namespaced(fake.client(), "app");
    admin
        .create(
            &Default::default(),
            &serde_json::from_value(json!({"metadata": {"name": "d"}, "spec": {
                "selector": {"matchLabels": {"a": "b"}},
                "template": {"metadata": {"labels": {"a": "b"}}, "spec": {"containers": []}}}}))
            .unwrap(),
        )
        .await
        .unwrap();
    let op: Api<Deployment> = Api::namespaced(fake.client_as(account()), "app");
    let status = Patch::Merge(json!({"status": {"replicas": 1}}));
    assert_eq!(
        code(op.patch_status("d", &Default::default(), &status).await),
        403
    );
    assert_eq!(fake.denied()[0].1.resource, "deployments/status");
    let labels = Patch::Merge(json!({"metadata": {"labels": {"x": "y"}}}));
    assert_eq!(code(op.patch("d", &Default::default(), &labels).await), 200);
}

#[tokio::test]
async fn watch_is_its_own_verb_and_a_field_selector_names_the_object() {
    let fake = FakeApi::with_rbac(Rbac::from_objects(&role(
        "app",
        json!([{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list", "watch"],
                "resourceNames": ["mine"]}]),
    )));
    let op: Api<ConfigMap> = Api::namespaced(fake.client_as(account()), "app");
    let mine = ListParams::default().fields("metadata.name=mine");
    assert_eq!(code(op.list(&mine).await), 200);
    assert_eq!(code(op.list(&ListParams::default()).await), 403);
    let theirs = ListParams::default().fields("metadata.name=theirs");
    assert_eq!(code(op.list(&theirs).await), 403);
    let watch = kube::api::WatchParams::default().fields("metadata.name=mine");
    assert_eq!(code(op.watch(&watch, "0").await.map(|_| ())), 200);
    let watch = kube::api::WatchParams::default();
    assert_eq!(code(op.watch(&watch, "0").await.map(|_| ())), 403);
}
