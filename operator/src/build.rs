//! Pure functions from a `RealtimeGateway` (and its compiled policy bundle)
//! to the Kubernetes objects that run it. No API calls here: every output is
//! unit-tested and validated against the Kubernetes schemas.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HPAScalingPolicy, HPAScalingRules, HorizontalPodAutoscaler,
    HorizontalPodAutoscalerBehavior, HorizontalPodAutoscalerSpec, MetricIdentifier, MetricSpec,
    MetricTarget, PodsMetricSource, ResourceMetricSource,
};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMap, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, KeyToPath, Lifecycle, LifecycleHandler, ObjectFieldSelector,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, PodSpec, PodTemplateSpec, Probe,
    ResourceRequirements, SecretVolumeSource, SecurityContext, Service, ServiceAccount,
    ServicePort, ServiceSpec, SleepAction, TopologySpreadConstraint, Volume, VolumeMount,
};
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, OwnerReference};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};
use switchboard_config::{GatewayConfig, LogFormat, NatsConfig, PolicyBundle};

use crate::crd::RealtimeGateway;

pub const CONFIG_DIR: &str = "/etc/switchboard";
pub const CONFIG_KEY: &str = "switchboard.yaml";
pub const POLICY_KEY: &str = "policy.yaml";
const HS256_PATH: &str = "/var/run/switchboard/auth/hs256";
const NATS_CREDS_PATH: &str = "/var/run/switchboard/nats/nats.creds";
const AUDIT_DIR: &str = "/var/lib/switchboard/audit";
/// Pod template annotation whose change rolls the pods: the hash of the
/// gateway config (not of the policy bundle, which the gateway hot-reloads).
pub const CONFIG_HASH: &str = "switchboard.dev/config-hash";
/// Pod template annotation: the hash of the Secret keys the gateway mounts
/// (HS256 key, NATS credentials), so a changed Secret rolls the pods.
pub const SECRETS_HASH: &str = "switchboard.dev/secrets-hash";
/// The Pods metric (custom metrics API) of open connections per pod.
pub const CONNECTIONS_METRIC: &str = "switchboard_connections";
const PORT: i32 = 8000;
/// The gateway's admin listener (`/metrics`, `/healthz`, `/readyz`): a
/// container port named `admin`, never in the Service.
pub const ADMIN_PORT: i32 = 9090;
const DEFAULT_REPLICAS: i32 = 2;

/// Why a gateway cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("the RealtimeGateway has no name, namespace or uid yet")]
    Incomplete,
    #[error("invalid gateway settings: {0}")]
    Config(String),
    /// Without a key the gateway runs in development mode, where tokens
    /// signed with its published development secret pass and its console
    /// mints them for anyone: never what a cluster should serve.
    #[error(
        "spec.auth names no key: set hs256Secret or jwksUrl (without one the gateway would accept tokens signed with its public development secret)"
    )]
    NoAuthKey,
}

/// Everything the operator applies for one gateway.
#[derive(Debug, Clone)]
pub struct Objects {
    pub service_account: ServiceAccount,
    pub config_map: ConfigMap,
    pub deployment: Deployment,
    pub service: Service,
    pub pdb: PodDisruptionBudget,
    /// `None`: no autoscaling (an existing HPA is deleted).
    pub hpa: Option<HorizontalPodAutoscaler>,
}

pub fn labels(gw: &RealtimeGateway) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "switchboard-gateway".to_owned(),
        ),
        ("app.kubernetes.io/instance".to_owned(), gw.name_any()),
        (
            "app.kubernetes.io/managed-by".to_owned(),
            "switchboard-operator".to_owned(),
        ),
    ])
}

/// The label selector of a gateway's pods (stable across updates).
pub fn selector(gw: &RealtimeGateway) -> BTreeMap<String, String> {
    BTreeMap::from([
        (
            "app.kubernetes.io/name".to_owned(),
            "switchboard-gateway".to_owned(),
        ),
        ("app.kubernetes.io/instance".to_owned(), gw.name_any()),
    ])
}

pub fn selector_string(gw: &RealtimeGateway) -> String {
    selector(gw)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn meta(gw: &RealtimeGateway, owner: &OwnerReference, suffix: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(format!("{}{suffix}", gw.name_any())),
        namespace: gw.namespace(),
        labels: Some(labels(gw)),
        owner_references: Some(vec![owner.clone()]),
        ..ObjectMeta::default()
    }
}

/// The gateway's config file, in the shared format the gateway reads.
pub fn gateway_config(gw: &RealtimeGateway) -> GatewayConfig {
    let spec = &gw.spec;
    let mut c = GatewayConfig {
        listen: format!("0.0.0.0:{PORT}"),
        admin_listen: Some(format!("0.0.0.0:{ADMIN_PORT}")),
        region: spec.region.clone(),
        policy_file: Some(format!("{CONFIG_DIR}/{POLICY_KEY}").into()),
        log_format: LogFormat::Json,
        ..GatewayConfig::default()
    };
    if !spec.allowed_origins.is_empty() {
        c.allowed_origins = spec.allowed_origins.clone();
    }
    if let Some(d) = spec.drain_seconds {
        c.drain_seconds = d.into();
    }
    if let Some(ms) = spec.write_delay_millis {
        c.websocket.write_delay_ms = ms.into();
    }
    let auth = &spec.auth;
    c.auth.issuer = auth.issuer.clone();
    c.auth.audiences = auth.audiences.clone();
    c.auth.jwks_url = auth.jwks_url.clone();
    c.auth.tenant_claim = auth.tenant_claim.clone();
    if auth.hs256_secret.is_some() {
        c.auth.hs256_secret_file = Some(HS256_PATH.into());
    }
    let l = &spec.limits;
    if let Some(v) = l.connections_per_pod {
        c.limits.max_connections = v.max(1) as u64;
    }
    if let Some(v) = l.subscriptions_per_connection {
        c.limits.max_subscriptions_per_connection = v.max(1) as u32;
    }
    if let Some(v) = l.message_bytes {
        c.limits.max_message_bytes = v.max(1024) as u64;
    }
    if let Some(v) = l.publish_rate_per_minute {
        c.limits.messages_per_minute = v.max(1) as u32;
    }
    if let Some(dp) = &spec.data_protection {
        if let Some(scope) = &dp.erase_scope {
            c.data_protection.erase_scope = scope.clone();
        }
        if let Some(b) = dp.block_seconds {
            c.data_protection.block_seconds = b.max(0) as u64;
        }
        if dp.audit.volume_claim.is_some() {
            c.data_protection.audit_file = Some(format!("{AUDIT_DIR}/audit.jsonl").into());
        }
    }
    if let Some(n) = &spec.nats {
        c.nats = Some(NatsConfig {
            urls: n.urls.clone(),
            credentials_file: n
                .credentials_secret
                .as_ref()
                .map(|_| NATS_CREDS_PATH.into()),
            regions: n.regions.clone(),
            placement_cluster: Some(
                n.placement_cluster
                    .clone()
                    .unwrap_or_else(|| spec.region.clone()),
            ),
            stream_replicas: n.stream_replicas.unwrap_or(3) as usize,
            ..NatsConfig::default()
        });
    }
    c
}

pub fn sha256(text: &str) -> String {
    sha256_bytes(text.as_bytes())
}

pub fn sha256_bytes(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Build every object for a gateway and its compiled bundle.
pub fn build(
    gw: &RealtimeGateway,
    bundle: &PolicyBundle,
    default_image: &str,
) -> Result<Objects, BuildError> {
    if gw.metadata.name.is_none() || gw.metadata.namespace.is_none() || gw.metadata.uid.is_none() {
        return Err(BuildError::Incomplete);
    }
    let owner = gw.controller_owner_ref(&()).ok_or(BuildError::Incomplete)?;
    if gw.spec.auth.hs256_secret.is_none() && gw.spec.auth.jwks_url.is_none() {
        return Err(BuildError::NoAuthKey);
    }
    let config = gateway_config(gw);
    config
        .validate()
        .map_err(|e| BuildError::Config(e.to_string()))?;
    let config_yaml = config.to_yaml();
    let hash = sha256(&config_yaml);
    let name = gw.name_any();
    let spec = &gw.spec;

    let config_map = ConfigMap {
        metadata: meta(gw, &owner, "-config"),
        data: Some(BTreeMap::from([
            (CONFIG_KEY.to_owned(), config_yaml),
            (POLICY_KEY.to_owned(), bundle.to_yaml()),
        ])),
        ..ConfigMap::default()
    };

    let mut volumes = vec![Volume {
        name: "config".into(),
        config_map: Some(ConfigMapVolumeSource {
            name: format!("{name}-config"),
            ..Default::default()
        }),
        ..Volume::default()
    }];
    let mut mounts = vec![VolumeMount {
        name: "config".into(),
        mount_path: CONFIG_DIR.into(),
        read_only: Some(true),
        ..VolumeMount::default()
    }];
    let mut secret_volume = |vol: &str, secret: &crate::crd::SecretKeyRef, path: &str| {
        let (dir, file) = path.rsplit_once('/').unwrap_or(("/", path));
        volumes.push(Volume {
            name: vol.into(),
            secret: Some(SecretVolumeSource {
                secret_name: Some(secret.name.clone()),
                items: Some(vec![KeyToPath {
                    key: secret.key.clone(),
                    path: file.into(),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: vol.into(),
            mount_path: dir.into(),
            read_only: Some(true),
            ..VolumeMount::default()
        });
    };
    if let Some(s) = &spec.auth.hs256_secret {
        secret_volume("auth", s, HS256_PATH);
    }
    if let Some(s) = spec
        .nats
        .as_ref()
        .and_then(|n| n.credentials_secret.as_ref())
    {
        secret_volume("nats-credentials", s, NATS_CREDS_PATH);
    }
    if let Some(claim) = spec
        .data_protection
        .as_ref()
        .and_then(|d| d.audit.volume_claim.as_ref())
    {
        volumes.push(Volume {
            name: "audit".into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim.clone(),
                read_only: Some(false),
            }),
            ..Volume::default()
        });
        mounts.push(VolumeMount {
            name: "audit".into(),
            mount_path: AUDIT_DIR.into(),
            ..VolumeMount::default()
        });
    }

    let mut env = vec![EnvVar {
        name: "POD_NAME".into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: "metadata.name".into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..EnvVar::default()
    }];
    if let Some(t) = &spec.telemetry {
        if let Some(endpoint) = &t.otlp_endpoint {
            env.push(EnvVar {
                name: "OTEL_EXPORTER_OTLP_ENDPOINT".into(),
                value: Some(endpoint.clone()),
                ..EnvVar::default()
            });
        }
        if let Some(ratio) = t.sampling_ratio {
            env.push(EnvVar {
                name: "OTEL_TRACES_SAMPLER".into(),
                value: Some("parentbased_traceidratio".into()),
                ..EnvVar::default()
            });
            env.push(EnvVar {
                name: "OTEL_TRACES_SAMPLER_ARG".into(),
                value: Some(ratio.to_string()),
                ..EnvVar::default()
            });
        }
        env.push(EnvVar {
            name: "OTEL_SERVICE_NAME".into(),
            value: Some("switchboard-gateway".into()),
            ..EnvVar::default()
        });
    }

    if let Some(threads) = worker_threads(spec.resources.as_ref()) {
        env.push(EnvVar {
            name: "TOKIO_WORKER_THREADS".into(),
            value: Some(threads.to_string()),
            ..EnvVar::default()
        });
    }

    let probe = |path: &str, period: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("admin".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(3),
        ..Probe::default()
    };
    let drain = i64::from(spec.drain_seconds.unwrap_or(30));
    let mut pod_labels = labels(gw);
    pod_labels.extend(spec.pod_labels.clone());
    pod_labels.extend(selector(gw));
    let mut pod_annotations = spec.pod_annotations.clone();
    pod_annotations.insert(CONFIG_HASH.into(), hash);

    let container = Container {
        name: "gateway".into(),
        image: Some(
            spec.image
                .clone()
                .unwrap_or_else(|| default_image.to_owned()),
        ),
        args: Some(vec![
            "--config".into(),
            format!("{CONFIG_DIR}/{CONFIG_KEY}"),
        ]),
        ports: Some(vec![
            ContainerPort {
                name: Some("http".into()),
                container_port: PORT,
                ..Default::default()
            },
            ContainerPort {
                name: Some("admin".into()),
                container_port: ADMIN_PORT,
                ..Default::default()
            },
        ]),
        env: Some(env),
        readiness_probe: Some(probe("/readyz", 5)),
        liveness_probe: Some(probe("/healthz", 10)),
        // Up to 60 s to start (NATS connect, stream setup) before liveness
        // counts; a slow start is not a crash loop.
        startup_probe: Some(Probe {
            failure_threshold: Some(30),
            ..probe("/healthz", 2)
        }),
        // Let endpoints stop routing new clients here before the drain begins.
        lifecycle: Some(Lifecycle {
            pre_stop: Some(LifecycleHandler {
                sleep: Some(SleepAction { seconds: 5 }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        resources: spec.resources.clone(),
        volume_mounts: Some(mounts),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Container::default()
    };
    let deployment = Deployment {
        metadata: meta(gw, &owner, ""),
        spec: DeploymentSpec {
            // With autoscaling the HPA owns the replica count.
            replicas: if spec.autoscaling.is_some() {
                None
            } else {
                Some(spec.replicas.unwrap_or(DEFAULT_REPLICAS))
            },
            selector: LabelSelector {
                match_labels: Some(selector(gw)),
                ..Default::default()
            },
            strategy: Some(DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_unavailable: Some(IntOrString::Int(0)),
                    max_surge: Some(IntOrString::Int(1)),
                }),
            }),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(pod_annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(name.clone()),
                    automount_service_account_token: Some(false),
                    termination_grace_period_seconds: Some(drain + 20),
                    security_context: Some(PodSecurityContext {
                        run_as_non_root: Some(true),
                        run_as_user: Some(65532),
                        seccomp_profile: Some(k8s_openapi::api::core::v1::SeccompProfile {
                            type_: "RuntimeDefault".into(),
                            ..Default::default()
                        }),
                        ..Default::default()
                    }),
                    containers: vec![container],
                    volumes: Some(volumes),
                    image_pull_secrets: non_empty(spec.image_pull_secrets.clone()),
                    node_selector: non_empty_map(spec.node_selector.clone()),
                    tolerations: non_empty(spec.tolerations.clone()),
                    affinity: spec.affinity.clone(),
                    topology_spread_constraints: Some(
                        spec.topology_spread_constraints
                            .clone()
                            .unwrap_or_else(|| default_spread(gw)),
                    )
                    .filter(|c| !c.is_empty()),
                    priority_class_name: spec.priority_class_name.clone(),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        },
        ..Deployment::default()
    };

    let mut service_meta = meta(gw, &owner, "");
    if !spec.service.annotations.is_empty() {
        service_meta.annotations = Some(spec.service.annotations.clone());
    }
    let service = Service {
        metadata: service_meta,
        spec: Some(ServiceSpec {
            type_: Some(spec.service.type_.clone()),
            selector: Some(selector(gw)),
            ports: Some(vec![ServicePort {
                name: Some("http".into()),
                port: spec.service.port,
                target_port: Some(IntOrString::String("http".into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    };

    let pdb = PodDisruptionBudget {
        metadata: meta(gw, &owner, ""),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(1)),
            selector: Some(LabelSelector {
                match_labels: Some(selector(gw)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..PodDisruptionBudget::default()
    };

    let hpa = spec
        .autoscaling
        .as_ref()
        .map(|a| autoscaler(gw, &owner, a, drain));

    Ok(Objects {
        service_account: ServiceAccount {
            metadata: meta(gw, &owner, ""),
            automount_service_account_token: Some(false),
            ..Default::default()
        },
        config_map,
        deployment,
        service,
        pdb,
        hpa,
    })
}

fn non_empty<T>(v: Vec<T>) -> Option<Vec<T>> {
    Some(v).filter(|v| !v.is_empty())
}

fn non_empty_map(m: BTreeMap<String, String>) -> Option<BTreeMap<String, String>> {
    Some(m).filter(|m| !m.is_empty())
}

/// Prefer one pod of skew at most across zones and across nodes.
fn default_spread(gw: &RealtimeGateway) -> Vec<TopologySpreadConstraint> {
    ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
        .into_iter()
        .map(|key| TopologySpreadConstraint {
            max_skew: 1,
            topology_key: key.into(),
            when_unsatisfiable: "ScheduleAnyway".into(),
            label_selector: Some(LabelSelector {
                match_labels: Some(selector(gw)),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect()
}

/// The HPA: connections per pod (Pods metric) and/or CPU, whichever asks
/// for more pods; scale-down one pod at a time, slowly enough that one
/// pod's clients have reconnected before the next pod drains.
fn autoscaler(
    gw: &RealtimeGateway,
    owner: &OwnerReference,
    a: &crate::crd::gateway::Autoscaling,
    drain_seconds: i64,
) -> HorizontalPodAutoscaler {
    let mut metrics = Vec::new();
    if let Some(per_pod) = a.target_connections_per_pod {
        metrics.push(MetricSpec {
            type_: "Pods".into(),
            pods: Some(PodsMetricSource {
                metric: MetricIdentifier {
                    name: CONNECTIONS_METRIC.into(),
                    selector: None,
                },
                target: MetricTarget {
                    type_: "AverageValue".into(),
                    average_value: Some(Quantity(per_pod.to_string())),
                    ..Default::default()
                },
            }),
            ..Default::default()
        });
    }
    let cpu = match (a.target_cpu_utilization, a.target_connections_per_pod) {
        (Some(cpu), _) => Some(cpu),
        (None, None) => Some(70),
        (None, Some(_)) => None,
    };
    if let Some(cpu) = cpu {
        metrics.push(MetricSpec {
            type_: "Resource".into(),
            resource: Some(ResourceMetricSource {
                name: "cpu".into(),
                target: MetricTarget {
                    type_: "Utilization".into(),
                    average_utilization: Some(cpu),
                    ..Default::default()
                },
            }),
            ..Default::default()
        });
    }
    let period = a
        .scale_down_period_seconds
        .unwrap_or_else(|| (drain_seconds * 2).clamp(60, 1800) as i32);
    HorizontalPodAutoscaler {
        metadata: meta(gw, owner, ""),
        spec: HorizontalPodAutoscalerSpec {
            scale_target_ref: CrossVersionObjectReference {
                api_version: Some("apps/v1".into()),
                kind: "Deployment".into(),
                name: gw.name_any(),
            },
            min_replicas: Some(a.min_replicas),
            max_replicas: a.max_replicas,
            metrics: Some(metrics),
            behavior: Some(HorizontalPodAutoscalerBehavior {
                scale_down: Some(HPAScalingRules {
                    stabilization_window_seconds: Some(
                        a.scale_down_stabilization_seconds.unwrap_or(600),
                    ),
                    select_policy: Some("Min".into()),
                    policies: Some(vec![HPAScalingPolicy {
                        type_: "Pods".into(),
                        value: 1,
                        period_seconds: period,
                    }]),
                    ..Default::default()
                }),
                scale_up: None,
            }),
        },
        ..HorizontalPodAutoscaler::default()
    }
}

/// The Secret keys a gateway mounts.
pub fn secret_refs(gw: &RealtimeGateway) -> Vec<&crate::crd::SecretKeyRef> {
    let nats = gw
        .spec
        .nats
        .as_ref()
        .and_then(|n| n.credentials_secret.as_ref());
    gw.spec.auth.hs256_secret.iter().chain(nats).collect()
}

impl Objects {
    /// Stamp the digest of the mounted Secrets' content on the pod
    /// template: a changed Secret rolls the pods.
    pub fn roll_on_secrets(&mut self, digest: &str) {
        if let Some(meta) = self.deployment.spec.template.metadata.as_mut() {
            meta.annotations
                .get_or_insert_default()
                .insert(SECRETS_HASH.into(), digest.into());
        }
    }

    /// Every object as JSON, with `apiVersion` and `kind` (for validation and golden tests).
    pub fn to_json(&self) -> Vec<serde_json::Value> {
        fn typed<K: Resource<DynamicType = ()> + serde::Serialize>(o: &K) -> serde_json::Value {
            let mut v = serde_json::to_value(o).unwrap_or_default();
            if let Some(m) = v.as_object_mut() {
                m.insert("apiVersion".into(), K::api_version(&()).into());
                m.insert("kind".into(), K::kind(&()).into());
            }
            v
        }
        let mut out = vec![
            typed(&self.service_account),
            typed(&self.config_map),
            typed(&self.deployment),
            typed(&self.service),
            typed(&self.pdb),
        ];
        if let Some(h) = &self.hpa {
            out.push(typed(h));
        }
        out
    }
}

/// The gateway's worker threads when its CPU request alone says what it may
/// use: the request rounded up (at least one), with no CPU limit set.
///
/// A limit sets the container's CPU quota, which the runtime reads itself;
/// without one the runtime starts a worker per core of the node, and several
/// gateway pods on one node then run more busy threads than it has cores
/// (measured in `docs/benchmarks.md`: two gateways of two workers each on two
/// cores deliver about two thirds of what two of one worker each do).
pub fn worker_threads(resources: Option<&ResourceRequirements>) -> Option<u32> {
    let resources = resources?;
    if resources
        .limits
        .as_ref()
        .is_some_and(|l| l.contains_key("cpu"))
    {
        return None;
    }
    let request = resources.requests.as_ref()?.get("cpu")?;
    let millicores = cpu_millicores(&request.0)?;
    Some(u32::try_from(millicores.div_ceil(1000)).ok()?.max(1))
}

/// A CPU quantity in millicores: `500m`, `1`, `1.5`, `2000m`. Other forms
/// (exponents, binary suffixes, which nobody writes for CPU) give `None`.
fn cpu_millicores(quantity: &str) -> Option<u64> {
    let q = quantity.trim();
    if let Some(milli) = q.strip_suffix('m') {
        return milli.parse::<u64>().ok();
    }
    let (whole, fraction) = q.split_once('.').unwrap_or((q, ""));
    if fraction.len() > 3 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let whole: u64 = if whole.is_empty() {
        0
    } else {
        whole.parse().ok()?
    };
    let fraction: u64 = format!("{fraction:0<3}").parse().ok()?;
    whole.checked_mul(1000)?.checked_add(fraction)
}
