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

#[test]
fn autoscaling_follows_connections_and_cpu_and_scales_down_one_drain_at_a_time() {
    use switchboard_operator::crd::gateway::Autoscaling;
    let mut gw = example_gateway();
    gw.spec.drain_seconds = Some(45);
    let scaling = |a: Autoscaling| {
        let mut g = gw.clone();
        g.spec.autoscaling = Some(a);
        let hpa = build::build(&g, &Default::default(), "img:1")
            .unwrap()
            .hpa
            .unwrap();
        serde_json::to_value(hpa.spec).unwrap()
    };
    let base = Autoscaling {
        min_replicas: 2,
        max_replicas: 10,
        target_cpu_utilization: None,
        target_connections_per_pod: None,
        scale_down_period_seconds: None,
        scale_down_stabilization_seconds: None,
    };
    // CPU alone by default.
    let cpu = scaling(base.clone());
    assert_eq!(cpu["metrics"].as_array().unwrap().len(), 1);
    assert_eq!(
        cpu["metrics"][0]["resource"]["target"]["averageUtilization"],
        70
    );
    // Connections per pod through the custom metrics API, CPU only if asked.
    let conns = scaling(Autoscaling {
        target_connections_per_pod: Some(20000),
        ..base.clone()
    });
    assert_eq!(
        conns["metrics"].as_array().unwrap().len(),
        1,
        "no CPU unless asked"
    );
    assert_eq!(conns["metrics"][0]["type"], "Pods");
    assert_eq!(
        conns["metrics"][0]["pods"]["metric"]["name"],
        "switchboard_connections"
    );
    assert_eq!(
        conns["metrics"][0]["pods"]["target"]["averageValue"],
        "20000"
    );
    let both = scaling(Autoscaling {
        target_connections_per_pod: Some(20000),
        target_cpu_utilization: Some(80),
        ..base.clone()
    });
    let kinds: Vec<&str> = both["metrics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["Pods", "Resource"]);
    // Scale-down: one pod per two drains (90 s here), after 10 minutes of
    // low load; scale-up is the HPA's default (fast).
    let down = &cpu["behavior"]["scaleDown"];
    assert_eq!(down["stabilizationWindowSeconds"], 600);
    assert_eq!(
        down["policies"],
        serde_json::json!([{"type": "Pods", "value": 1, "periodSeconds": 90}])
    );
    assert_eq!(cpu["behavior"].get("scaleUp"), None);
    let tuned = scaling(Autoscaling {
        scale_down_period_seconds: Some(300),
        scale_down_stabilization_seconds: Some(0),
        ..base
    });
    assert_eq!(
        tuned["behavior"]["scaleDown"]["policies"][0]["periodSeconds"],
        300
    );
    assert_eq!(
        tuned["behavior"]["scaleDown"]["stabilizationWindowSeconds"],
        0
    );
}

#[test]
fn scheduling_settings_reach_the_pods_and_spread_is_on_by_default() {
    let mut gw = example_gateway();
    let o = build::build(&gw, &Default::default(), "img:1").unwrap();
    let pod = serde_json::to_value(o.deployment.spec.template.spec.unwrap()).unwrap();
    let spread = pod["topologySpreadConstraints"].as_array().unwrap();
    let keys: Vec<&str> = spread
        .iter()
        .map(|c| c["topologyKey"].as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
    );
    assert!(
        spread
            .iter()
            .all(|c| c["whenUnsatisfiable"] == "ScheduleAnyway")
    );
    assert_eq!(
        spread[0]["labelSelector"]["matchLabels"]["app.kubernetes.io/instance"],
        gw.name_any()
    );
    let startup = &pod["containers"][0]["startupProbe"];
    assert_eq!(startup["httpGet"]["path"], "/healthz");
    assert_eq!(startup["failureThreshold"], 30);

    gw.spec = serde_json::from_value(serde_json::json!({
        "region": "eu",
        "auth": {"jwksUrl": "https://id.example.com/jwks.json"},
        "imagePullSecrets": [{"name": "registry"}],
        "nodeSelector": {"pool": "realtime"},
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "realtime", "effect": "NoSchedule"}],
        "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "arch", "operator": "In", "values": ["arm64"]}]}]}}},
        "topologySpreadConstraints": [],
        "priorityClassName": "realtime-critical"
    }))
    .unwrap();
    let o = build::build(&gw, &Default::default(), "img:1").unwrap();
    let pod = serde_json::to_value(o.deployment.spec.template.spec.unwrap()).unwrap();
    assert_eq!(
        pod["imagePullSecrets"],
        serde_json::json!([{"name": "registry"}])
    );
    assert_eq!(pod["nodeSelector"]["pool"], "realtime");
    assert_eq!(pod["tolerations"][0]["key"], "dedicated");
    assert_eq!(
        pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            [0]["matchExpressions"][0]["values"][0],
        "arm64"
    );
    assert_eq!(pod["priorityClassName"], "realtime-critical");
    assert_eq!(
        pod.get("topologySpreadConstraints"),
        None,
        "an empty list turns the default off"
    );
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
        "spec": {"region": "local", "auth": {"jwksUrl": "https://id.example.com/jwks.json"}}
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

/// A gateway without a key would run in development mode: tokens signed
/// with its public development secret would pass. The operator refuses to
/// build one; either key is enough.
#[test]
fn a_gateway_without_an_auth_key_is_refused() {
    let mut gw = example_gateway();
    gw.spec.auth.hs256_secret = None;
    gw.spec.auth.jwks_url = None;
    let err = build::build(&gw, &Default::default(), "img")
        .expect_err("a gateway without a key was built");
    assert!(err.to_string().contains("hs256Secret or jwksUrl"), "{err}");

    // An empty or scheme-less jwksUrl is no key either.
    for url in ["", "id.example.com/jwks.json"] {
        gw.spec.auth.jwks_url = Some(url.into());
        let err = build::build(&gw, &Default::default(), "img")
            .expect_err("a gateway with an unusable jwksUrl was built");
        assert!(err.to_string().contains("auth.jwks_url"), "{err}");
    }
    gw.spec.auth.jwks_url = Some("https://id.example.com/jwks.json".into());
    let objects = build::build(&gw, &Default::default(), "img").unwrap();
    assert!(
        serde_json::Value::from(objects.to_json())
            .to_string()
            .contains("id.example.com/jwks.json")
    );
    gw.spec.auth.jwks_url = None;
    gw.spec.auth.hs256_secret = example_gateway().spec.auth.hs256_secret;
    assert!(gw.spec.auth.hs256_secret.is_some());
    build::build(&gw, &Default::default(), "img").unwrap();
}

#[test]
fn data_protection_settings_reach_the_gateway_and_the_pod() {
    let mut gw = example_gateway();
    gw.spec.data_protection = Some(crd::gateway::DataProtectionSpec {
        erase_scope: Some("gdpr:erase".into()),
        block_seconds: Some(3600),
        audit: crd::gateway::AuditSpec {
            volume_claim: Some("switchboard-audit".into()),
        },
    });
    let mut policies = example_policies();
    policies[0].spec.residency = vec!["eu".into()];
    policies[0].spec.max_retention_days = Some(30);
    let tenant = policies[0].spec.tenant.clone();
    let (verdicts, bundle) = validate::judge(true, &policies);
    assert!(verdicts.values().all(|v| v.is_accepted()), "{verdicts:?}");
    let objects = build::build(&gw, &bundle, "img:1").unwrap();
    let data = objects.config_map.data.clone().unwrap();
    let config = GatewayConfig::from_yaml(&data[CONFIG_KEY]).unwrap();
    assert_eq!(config.data_protection.erase_scope, "gdpr:erase");
    assert_eq!(config.data_protection.block_seconds, 3600);
    let audit = config.data_protection.audit_file.unwrap();
    assert_eq!(
        audit.to_str(),
        Some("/var/lib/switchboard/audit/audit.jsonl")
    );
    let pod = objects.deployment.spec.template.spec.clone().unwrap();
    let volume = pod
        .volumes
        .unwrap()
        .into_iter()
        .find(|v| v.name == "audit")
        .expect("the audit volume");
    assert_eq!(
        volume.persistent_volume_claim.unwrap().claim_name,
        "switchboard-audit"
    );
    let mount = pod.containers[0]
        .volume_mounts
        .clone()
        .unwrap()
        .into_iter()
        .find(|m| m.name == "audit")
        .expect("the audit mount");
    assert_eq!(Path::new(&mount.mount_path), audit.parent().unwrap());
    assert_ne!(mount.read_only, Some(true), "the gateway appends to it");
    let parsed = PolicyBundle::from_yaml(&data[POLICY_KEY]).unwrap();
    let p = &parsed.tenants[&tenant];
    assert_eq!(p.residency, ["eu"]);
    assert_eq!(p.max_retention_days, Some(30));
    assert!(parsed.resident_in(&tenant, "eu") && !parsed.resident_in(&tenant, "us"));
}

/// The gateway container's `TOKIO_WORKER_THREADS`, if the operator set one.
fn worker_threads_env(gw: &RealtimeGateway) -> Option<String> {
    let o = build::build(gw, &Default::default(), "img:1").unwrap();
    let pod = o.deployment.spec.template.spec.unwrap();
    pod.containers[0]
        .env
        .iter()
        .flatten()
        .find(|e| e.name == "TOKIO_WORKER_THREADS")
        .map(|e| e.value.clone().unwrap())
}

#[test]
fn worker_threads_follow_the_cpu_request_when_no_cpu_limit_bounds_them() {
    let with = |resources: serde_json::Value| {
        let mut gw = example_gateway();
        gw.spec.resources = serde_json::from_value(resources).unwrap();
        worker_threads_env(&gw)
    };
    // The example asks for 500m and limits memory only: one worker, not one
    // per core of whatever node the pod lands on.
    assert_eq!(worker_threads_env(&example_gateway()).as_deref(), Some("1"));
    assert_eq!(
        with(serde_json::json!({"requests": {"cpu": "2500m"}})).as_deref(),
        Some("3")
    );
    assert_eq!(
        with(serde_json::json!({"requests": {"cpu": "2"}})).as_deref(),
        Some("2")
    );
    assert_eq!(
        with(serde_json::json!({"requests": {"cpu": "1.25"}})).as_deref(),
        Some("2")
    );
    // A CPU limit is a quota the runtime reads itself.
    assert_eq!(
        with(serde_json::json!({"requests": {"cpu": "1"}, "limits": {"cpu": "4"}})),
        None
    );
    // Nothing requested, or a form this does not read: the runtime decides.
    assert_eq!(
        with(serde_json::json!({"requests": {"memory": "1Gi"}})),
        None
    );
    assert_eq!(with(serde_json::json!({"requests": {"cpu": "1e3"}})), None);
    assert_eq!(
        worker_threads_env(
            &serde_json::from_value(serde_json::json!({
                "apiVersion": "switchboard.dev/v1alpha1", "kind": "RealtimeGateway",
                "metadata": {"name": "mini", "namespace": "default", "uid": "uid-2"},
                "spec": {"region": "local", "auth": {"jwksUrl": "https://id.example.com/jwks.json"}}
            }))
            .unwrap()
        ),
        None
    );
}

#[test]
fn the_write_delay_reaches_the_gateway_config() {
    let mut gw = example_gateway();
    assert_eq!(build::gateway_config(&gw).websocket.write_delay_ms, 0);
    gw.spec.write_delay_millis = Some(100);
    let config = build::gateway_config(&gw);
    assert_eq!(config.websocket.write_delay_ms, 100);
    // What the gateway reads back is valid.
    switchboard_config::GatewayConfig::from_yaml(&config.to_yaml()).unwrap();
}
