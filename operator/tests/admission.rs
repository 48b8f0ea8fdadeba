//! The fake API admits custom resources as the API server does, from the
//! CRDs users apply: what the CRD's schema or CEL rules refuse never reaches
//! the operator in these tests either, and what they accept does.

mod fake_api;

use fake_api::FakeApi;
use fake_api::admission::evaluate;
use kube::Api;
use kube::api::{DynamicObject, Patch, PatchParams, PostParams};
use kube::discovery::ApiResource;
use serde_json::{Value, json};

const API: &str = "switchboard.dev/v1alpha1";

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "switchboard.dev".into(),
        version: "v1alpha1".into(),
        api_version: API.into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

fn gateways(fake: &FakeApi) -> Api<DynamicObject> {
    Api::namespaced_with(
        fake.client(),
        "ns",
        &resource("RealtimeGateway", "realtimegateways"),
    )
}

fn policies(fake: &FakeApi) -> Api<DynamicObject> {
    Api::namespaced_with(
        fake.client(),
        "ns",
        &resource("TopicPolicy", "topicpolicies"),
    )
}

fn gateway(spec: Value) -> DynamicObject {
    serde_json::from_value(json!({"apiVersion": API, "kind": "RealtimeGateway",
        "metadata": {"name": "rt"}, "spec": spec}))
    .unwrap()
}

fn policy(spec: Value) -> DynamicObject {
    serde_json::from_value(json!({"apiVersion": API, "kind": "TopicPolicy",
        "metadata": {"name": "p"}, "spec": spec}))
    .unwrap()
}

/// The 422 message, or the admitted object.
async fn create(api: &Api<DynamicObject>, obj: &DynamicObject) -> Result<Value, String> {
    match api.create(&PostParams::default(), obj).await {
        Ok(o) => Ok(serde_json::to_value(o).unwrap()),
        Err(kube::Error::Api(s)) => {
            assert_eq!((s.code, s.reason.as_str()), (422, "Invalid"), "{s:?}");
            Err(s.message)
        }
        Err(e) => panic!("{e}"),
    }
}

#[tokio::test]
async fn cel_rules_refuse_what_the_crd_refuses() {
    let fake = FakeApi::new();
    let api = gateways(&fake);
    let both = create(
        &api,
        &gateway(json!({"region": "eu", "replicas": 2,
            "autoscaling": {"minReplicas": 2, "maxReplicas": 4, "targetConnectionsPerPod": 10}})),
    )
    .await
    .unwrap_err();
    assert_eq!(
        both,
        "RealtimeGateway.switchboard.dev \"rt\" is invalid: spec: Invalid value: \"object\": set replicas or autoscaling, not both"
    );
    let inverted = create(
        &api,
        &gateway(
            json!({"region": "eu", "autoscaling": {"minReplicas": 5, "maxReplicas": 4},
            "resources": {"requests": {"cpu": "1"}}}),
        ),
    )
    .await
    .unwrap_err();
    assert!(
        inverted.contains(
            "spec.autoscaling: Invalid value: \"object\": minReplicas must not exceed maxReplicas"
        ),
        "{inverted}"
    );
    // CPU scaling needs a CPU request; scaling on connections alone does not.
    let no_request = create(
        &api,
        &gateway(
            json!({"region": "eu", "autoscaling": {"minReplicas": 1, "maxReplicas": 4},
            "resources": {"requests": {"memory": "1Gi"}}}),
        ),
    )
    .await
    .unwrap_err();
    assert!(
        no_request.contains("autoscaling on CPU needs resources.requests.cpu"),
        "{no_request}"
    );
    let explicit_cpu = create(
        &api,
        &gateway(
            json!({"region": "eu", "autoscaling": {"minReplicas": 1, "maxReplicas": 4,
            "targetConnectionsPerPod": 1000, "targetCpuUtilization": 60}}),
        ),
    )
    .await
    .unwrap_err();
    assert!(
        explicit_cpu.contains("resources.requests.cpu"),
        "{explicit_cpu}"
    );
    let connections_only = gateway(json!({"region": "eu",
        "autoscaling": {"minReplicas": 1, "maxReplicas": 4, "targetConnectionsPerPod": 1000}}));
    create(&api, &connections_only).await.unwrap();
    api.delete("rt", &Default::default()).await.unwrap();
    // The same rules hold for server-side apply and merge patch.
    create(&api, &gateway(json!({"region": "eu", "replicas": 2})))
        .await
        .unwrap();
    let apply = api
        .patch(
            "rt",
            &PatchParams::apply("someone"),
            &Patch::Apply(&gateway(json!({"region": "eu", "replicas": 2,
                "autoscaling": {"minReplicas": 2, "maxReplicas": 4, "targetConnectionsPerPod": 10}}))),
        )
        .await;
    assert!(
        matches!(&apply, Err(kube::Error::Api(s)) if s.code == 422),
        "{apply:?}"
    );
    let merge = api
        .patch(
            "rt",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"autoscaling":
                {"minReplicas": 1, "maxReplicas": 2, "targetConnectionsPerPod": 10}}})),
        )
        .await;
    assert!(
        matches!(&merge, Err(kube::Error::Api(s)) if s.code == 422),
        "{merge:?}"
    );
    let stored = fake
        .get(API, "realtimegateways", "ns", "rt")
        .expect("the admitted gateway");
    assert_eq!(
        stored["spec"].get("autoscaling"),
        None,
        "nothing refused was stored"
    );
}

#[tokio::test]
async fn the_schema_refuses_bad_values_prunes_unknown_fields_and_defaults() {
    let fake = FakeApi::new();
    let bad_pattern = create(
        &policies(&fake),
        &policy(json!({"gateway": "rt", "tenant": "acme",
            "subscribe": [{"pattern": "a.>.b"}]})),
    )
    .await
    .unwrap_err();
    assert!(
        bad_pattern.contains("spec.subscribe[0].pattern"),
        "{bad_pattern}"
    );
    let bad_type = create(
        &policies(&fake),
        &policy(json!({"gateway": "rt", "tenant": "acme",
            "subscribe": [{"pattern": "a.*", "class": "urgent"}]})),
    )
    .await
    .unwrap_err();
    assert!(bad_type.contains("spec.subscribe[0].class"), "{bad_type}");
    let missing = create(&gateways(&fake), &gateway(json!({"replicas": 1})))
        .await
        .unwrap_err();
    assert!(missing.contains("region"), "{missing}");

    let admitted = create(
        &gateways(&fake),
        &gateway(json!({"region": "eu", "replicas": 1, "madeUp": true,
            "service": {"port": 8080, "typo": "x"}})),
    )
    .await
    .unwrap();
    assert_eq!(
        admitted["spec"].get("madeUp"),
        None,
        "unknown fields are pruned"
    );
    assert_eq!(admitted["spec"]["service"].get("typo"), None);
    assert_eq!(
        admitted["spec"]["service"]["type"], "ClusterIP",
        "schema defaults are applied"
    );
    assert_eq!(admitted["spec"]["service"]["port"], 8080);
}

#[tokio::test]
async fn every_example_custom_resource_is_admitted() {
    let fake = FakeApi::new();
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples");
    let mut admitted = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        for doc in text.split("\n---") {
            let Ok(obj) = serde_saphyr::from_str::<Value>(doc) else {
                continue;
            };
            if obj["apiVersion"] != API {
                continue;
            }
            let plural = match obj["kind"].as_str() {
                Some("RealtimeGateway") => "realtimegateways",
                Some("TopicPolicy") => "topicpolicies",
                other => panic!("unknown kind {other:?}"),
            };
            let kind = obj["kind"].as_str().unwrap();
            let api: Api<DynamicObject> =
                Api::namespaced_with(fake.client(), "ns", &resource(kind, plural));
            let obj: DynamicObject = serde_json::from_value(obj).unwrap();
            create(&api, &obj).await.unwrap();
            admitted += 1;
        }
    }
    assert!(admitted >= 3, "found {admitted} example resources");
}

#[test]
fn the_cel_engine_is_real() {
    // Sanity of the engine on the constructs Kubernetes rules use.
    assert_eq!(
        evaluate("has(self.a) && !has(self.b)", &json!({"a": 1})),
        Ok(true)
    );
    assert_eq!(
        evaluate("self.min <= self.max", &json!({"min": 3, "max": 2})),
        Ok(false)
    );
    assert_eq!(
        evaluate("size(self) <= 2", &json!(["a", "b", "c"])),
        Ok(false)
    );
    assert_eq!(evaluate("self.matches('^a+$')", &json!("aaa")), Ok(true));
    assert!(evaluate("self.nope(", &json!({})).is_err());
    assert!(
        evaluate("self == oldSelf", &json!({})).is_err(),
        "not modelled"
    );
}
