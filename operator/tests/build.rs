//! The pure parts: generated CRDs match `crds/`, and what the operator builds
//! for the examples in `deploy/examples/` is what the gateway reads.

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::path::Path;

use k8s_openapi::api::apps::v1::Deployment;
use kube::ResourceExt;
use switchboard_config::{GatewayConfig, PolicyBundle};
use switchboard_operator::build::{self, CONFIG_HASH, CONFIG_KEY, POLICY_KEY};
use switchboard_operator::crd::{self, RealtimeGateway, TopicPolicy};
use switchboard_operator::validate;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn docs(file: &str) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(root().join(file)).unwrap();
    text.split("\n---")
        .filter(|d| d.contains("kind:"))
        .map(|d| serde_saphyr::from_str(d).unwrap())
        .collect()
}

fn example_gateway() -> RealtimeGateway {
    let mut gw: RealtimeGateway =
        serde_json::from_value(docs("deploy/examples/gateway.yaml").remove(0)).unwrap();
    gw.metadata.uid = Some("uid-1".into());
    gw
}

fn example_policies() -> Vec<TopicPolicy> {
    docs("deploy/examples/policies.yaml")
        .into_iter()
        .map(|d| serde_json::from_value(d).unwrap())
        .collect()
}

#[test]
fn checked_in_crds_are_the_generated_ones() {
    let on_disk = std::fs::read_to_string(root().join("crds/switchboard.dev.yaml")).unwrap();
    assert!(
        on_disk == crd::crds_yaml(),
        "crds/switchboard.dev.yaml is stale: run `cargo run -p switchboard-operator -- crdgen > crds/switchboard.dev.yaml`"
    );
}

#[test]
fn the_config_map_holds_exactly_what_the_gateway_reads() {
    let gw = example_gateway();
    let (verdicts, bundle) = validate::judge(true, &example_policies());
    assert!(verdicts.values().all(|v| v.is_accepted()), "{verdicts:?}");
    let objects = build::build(&gw, &bundle, "img:1").unwrap();
    let data = objects.config_map.data.clone().unwrap();
    // Parsed by the gateway's own parsers (the shared definition).
    let config = GatewayConfig::from_yaml(&data[CONFIG_KEY]).unwrap();
    assert_eq!(config.region, "eu");
    assert_eq!(config.allowed_origins, ["https://app.example.com"]);
    assert_eq!(config.limits.max_connections, 50_000);
    assert_eq!(
        config.auth.hs256_secret_file.unwrap().to_str(),
        Some("/var/run/switchboard/auth/hs256")
    );
    let nats = config.nats.unwrap();
    assert_eq!(nats.regions, ["eu", "us"]);
    assert_eq!(nats.placement_cluster.as_deref(), Some("eu"));
    assert_eq!(nats.stream_replicas, 3);
    assert_eq!(
        config.policy_file.unwrap().to_str(),
        Some("/etc/switchboard/policy.yaml")
    );
    assert_eq!(
        config.admin_listen.as_deref(),
        Some(format!("0.0.0.0:{}", build::ADMIN_PORT).as_str()),
        "metrics and probes on the admin listener"
    );
    // The admin port is a container port the probes use, and not in the Service.
    let pod = objects.deployment.spec.template.spec.clone().unwrap();
    let c = &pod.containers[0];
    let ports = c.ports.clone().unwrap();
    assert!(
        ports
            .iter()
            .any(|p| p.name.as_deref() == Some("admin") && p.container_port == build::ADMIN_PORT)
    );
    for probe in [&c.readiness_probe, &c.liveness_probe] {
        let port = &probe.as_ref().unwrap().http_get.as_ref().unwrap().port;
        assert_eq!(*port, IntOrString::String("admin".into()));
    }
    let service_ports = objects.service.spec.clone().unwrap().ports.unwrap();
    assert!(service_ports.iter().all(|p| p.port != build::ADMIN_PORT
        && p.target_port != Some(IntOrString::String("admin".into()))
        && p.target_port != Some(IntOrString::Int(build::ADMIN_PORT))));
    let parsed = PolicyBundle::from_yaml(&data[POLICY_KEY]).unwrap();
    assert_eq!(parsed, bundle);
    assert_eq!(parsed.tenants.keys().collect::<Vec<_>>(), ["1042", "acme"]);
    assert!(parsed.default.is_none());
}

fn hash(d: &Deployment) -> String {
    d.spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .as_ref()
        .unwrap()[CONFIG_HASH]
        .clone()
}

#[test]
fn gateway_changes_roll_pods_policy_changes_do_not() {
    let gw = example_gateway();
    let (_, bundle) = validate::judge(true, &example_policies());
    let before = build::build(&gw, &bundle, "img:1").unwrap();
    let (_, fewer) = validate::judge(true, &example_policies()[..1]);
    let policy_only = build::build(&gw, &fewer, "img:1").unwrap();
    assert_eq!(hash(&before.deployment), hash(&policy_only.deployment));
    assert_ne!(before.config_map.data, policy_only.config_map.data);
    let mut changed = gw.clone();
    changed
        .spec
        .allowed_origins
        .push("https://admin.example.com".into());
    let rolled = build::build(&changed, &bundle, "img:1").unwrap();
    assert_ne!(hash(&before.deployment), hash(&rolled.deployment));
}

#[test]
fn autoscaling_secrets_probes_and_ownership() {
    let gw = example_gateway();
    let o = build::build(&gw, &Default::default(), "img:1").unwrap();
    let spec = &o.deployment.spec;
    assert_eq!(spec.replicas, None, "the HPA owns the replica count");
    let hpa = o.hpa.as_ref().unwrap();
    assert_eq!(
        (hpa.spec.min_replicas, hpa.spec.max_replicas),
        (Some(2), 10)
    );
    let pod = spec.template.spec.as_ref().unwrap();
    assert_eq!(
        pod.termination_grace_period_seconds,
        Some(50),
        "drain + preStop + margin"
    );
    let c = &pod.containers[0];
    assert_eq!(
        c.readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/readyz")
    );
    assert_eq!(
        c.liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap()
            .path
            .as_deref(),
        Some("/healthz")
    );
    assert_eq!(
        c.security_context
            .as_ref()
            .unwrap()
            .read_only_root_filesystem,
        Some(true)
    );
    let volumes: Vec<String> = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .map(|v| v.name.clone())
        .collect();
    assert_eq!(volumes, ["config", "auth", "nats-credentials"]);
    for obj in o.to_json() {
        let owner = &obj["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "RealtimeGateway", "{obj}");
        assert_eq!(owner["controller"], true);
    }
    // Fixed replicas when not autoscaled; default 2.
    let mut fixed = gw.clone();
    fixed.spec.autoscaling = None;
    let o = build::build(&fixed, &Default::default(), "img:1").unwrap();
    assert_eq!(o.deployment.spec.replicas, Some(2));
    assert!(o.hpa.is_none());
    assert_eq!(o.deployment.name_any(), "realtime");
}

/// Compare with `operator/tests/golden/<name>.json`; `UPDATE_GOLDEN=1` rewrites it.
fn assert_golden(name: &str, objects: &[serde_json::Value]) {
    let rendered = serde_json::to_string_pretty(objects).unwrap() + "\n";
    let golden = root().join(format!("operator/tests/golden/{name}.json"));
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &rendered).unwrap();
    }
    let expected = std::fs::read_to_string(&golden).unwrap_or_default();
    assert!(
        expected == rendered,
        "golden output {name} changed; review and run with UPDATE_GOLDEN=1"
    );
}

#[test]
fn golden_render_of_the_examples() {
    let gw = example_gateway();
    let (_, bundle) = validate::judge(true, &example_policies());
    let objects = build::build(&gw, &bundle, "ghcr.io/switchboard-dev/gateway:0.1.0")
        .unwrap()
        .to_json();
    assert_golden("examples", &objects);
}

#[test]
fn golden_render_of_a_minimal_gateway() {
    let gw: RealtimeGateway = serde_json::from_value(serde_json::json!({
        "apiVersion": "switchboard.dev/v1alpha1", "kind": "RealtimeGateway",
        "metadata": {"name": "mini", "namespace": "default", "uid": "uid-2"},
        "spec": {"region": "local"}
    }))
    .unwrap();
    let objects = build::build(&gw, &Default::default(), "gw:1")
        .unwrap()
        .to_json();
    assert_golden("minimal", &objects);
}

#[test]
fn invalid_gateway_settings_are_reported_not_built() {
    let mut gw = example_gateway();
    gw.spec.region = "eu west".into();
    let err = build::build(&gw, &Default::default(), "img")
        .unwrap_err()
        .to_string();
    assert!(err.contains("region"), "{err}");
    let mut gw = example_gateway();
    gw.metadata.uid = None;
    assert!(build::build(&gw, &Default::default(), "img").is_err());
}
