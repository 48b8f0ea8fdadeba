//! `RealtimeGateway`: one gateway deployment in one region.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::SecretKeyRef;

/// A gateway deployment in one region: image, scale, NATS, auth, limits,
/// exposure and telemetry. The operator renders it into a ServiceAccount,
/// ConfigMap, Deployment, Service, HPA and PDB.
// Several printcolumns repeat `type_`: not a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "switchboard.dev",
    version = "v1alpha1",
    kind = "RealtimeGateway",
    namespaced,
    status = "RealtimeGatewayStatus",
    shortname = "rtgw",
    category = "switchboard",
    // Helm keeps CRDs (and so every custom resource) when a release is uninstalled.
    annotation("helm.sh/resource-policy", "keep"),
    printcolumn(name = "Region", type_ = "string", json_path = ".spec.region"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(
        name = "Policies",
        type_ = "integer",
        json_path = ".status.policiesApplied"
    ),
    printcolumn(
        name = "Status",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.replicas) && has(self.autoscaling))").message("set replicas or autoscaling, not both"))]
#[x_kube(validation = Rule::new(CPU_REQUEST_RULE).message("autoscaling on CPU needs resources.requests.cpu (utilization is a share of the request); set it, or scale on targetConnectionsPerPod only"))]
pub struct RealtimeGatewaySpec {
    /// Region name, stamped on events published here: 1-64 characters of `[A-Za-z0-9_-]`.
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9_-]+$"))]
    pub region: String,
    /// Gateway image; defaults to the operator's `--gateway-image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Fixed replica count (default 2). Mutually exclusive with `autoscaling`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub replicas: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscaling: Option<Autoscaling>,
    /// Cluster mode. Without it each pod is an independent embedded gateway
    /// (only sensible with one replica).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nats: Option<NatsSpec>,
    #[serde(default)]
    pub auth: AuthSpec,
    #[serde(default)]
    pub limits: LimitsSpec,
    #[serde(default)]
    pub service: ServiceSpec,
    /// Browser origins allowed (CORS and the WebSocket Origin check); empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub allowed_origins: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry: Option<TelemetrySpec>,
    /// Erasure by data subject and its audit trail (docs/data-protection.md).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_protection: Option<DataProtectionSpec>,
    /// Seconds over which clients are told to reconnect when a pod stops (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 86400))]
    pub drain_seconds: Option<u32>,
    /// Milliseconds a WebSocket connection that has just written an event
    /// holds the ones that follow, to write them together (default 0: every
    /// event at once). Trades up to this much latency for less CPU per
    /// delivery when connections receive tens of events a second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(max = 1000))]
    pub write_delay_millis: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pod_annotations: BTreeMap<String, String>,
    /// Secrets for pulling `image` from a private registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16))]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// How pods spread over the cluster. Default: at most one pod of skew
    /// across zones and across nodes, preferred (`ScheduleAnyway`), so a
    /// zone or node outage takes a fair share of connections, not all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
}

/// CPU scaling (an explicit CPU target, or no connections target) needs a
/// CPU request: the HPA measures utilization as a share of it.
const CPU_REQUEST_RULE: &str = "!has(self.autoscaling) || (has(self.autoscaling.targetConnectionsPerPod) && !has(self.autoscaling.targetCpuUtilization)) || (has(self.resources) && has(self.resources.requests) && 'cpu' in self.resources.requests)";

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.minReplicas <= self.maxReplicas").message("minReplicas must not exceed maxReplicas"))]
pub struct Autoscaling {
    #[schemars(range(min = 1))]
    pub min_replicas: i32,
    pub max_replicas: i32,
    /// Target average CPU utilization in percent of the CPU request.
    /// Default 70 without `targetConnectionsPerPod`; with it, CPU is only
    /// used when set (then the HPA follows whichever asks for more pods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 100))]
    pub target_cpu_utilization: Option<i32>,
    /// Target average open connections (WebSocket and SSE) per pod, read
    /// through the custom metrics API as the Pods metric
    /// `switchboard_connections` (prometheus-adapter rule in
    /// `deploy/observability/prometheus-adapter-values.yaml`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub target_connections_per_pod: Option<i64>,
    /// Seconds between removals of one pod when scaling down (default:
    /// twice `drainSeconds`, at least 60), so the clients of one draining
    /// pod have reconnected before the next pod drains.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 15, max = 3600))]
    pub scale_down_period_seconds: Option<i32>,
    /// How long load must stay low before any scale-down (default 600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 3600))]
    pub scale_down_stabilization_seconds: Option<i32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct NatsSpec {
    /// This region's NATS servers.
    #[schemars(length(min = 1, max = 32))]
    pub urls: Vec<String>,
    /// A Secret key holding a NATS `.creds` file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<SecretKeyRef>,
    /// Every region of the deployment (this one included).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub regions: Vec<String>,
    /// NATS cluster holding the region's stream (default: the region name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub placement_cluster: Option<String>,
    /// Replicas of the region's stream (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 5))]
    pub stream_replicas: Option<u32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// A Secret key holding the HS256 secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hs256_secret: Option<SecretKeyRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// Claim holding the tenant (default `tenant`, falling back to `company_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant_claim: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitsSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub connections_per_pod: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10000))]
    pub subscriptions_per_connection: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1024))]
    pub message_bytes: Option<i64>,
    /// Messages a connection may send per minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub publish_rate_per_minute: Option<i32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// `ClusterIP` (default), `NodePort` or `LoadBalancer`.
    #[serde(default = "default_service_type", rename = "type")]
    #[schemars(extend("enum" = ["ClusterIP", "NodePort", "LoadBalancer"]))]
    pub type_: String,
    #[serde(default = "default_port")]
    pub port: i32,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Default for ServiceSpec {
    fn default() -> Self {
        Self {
            type_: default_service_type(),
            port: default_port(),
            annotations: BTreeMap::new(),
        }
    }
}

fn default_service_type() -> String {
    "ClusterIP".into()
}
fn default_port() -> i32 {
    80
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct DataProtectionSpec {
    /// The token scope that may call the erase API besides `platform` (default `erase`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9_.:-]+$"))]
    pub erase_scope: Option<String>,
    /// Seconds publishes for an erased data subject are refused (default 30 days; 0: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 315_360_000))]
    pub block_seconds: Option<i64>,
    /// Where erasure audit records go.
    #[serde(default)]
    pub audit: AuditSpec,
}

/// The audit sink: the gateway's log (a JSON line with target
/// `switchboard::audit`, for the cluster's log pipeline) always, and a file on
/// a persistent volume claim when one is named (`ReadWriteMany`: every pod
/// appends to `audit.jsonl` there).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditSpec {
    /// A PersistentVolumeClaim (same namespace) mounted at `/var/lib/switchboard/audit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub volume_claim: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TelemetrySpec {
    /// OTLP endpoint for traces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
    /// Fraction of traces sampled, 0-1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub sampling_ratio: Option<f64>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RealtimeGatewayStatus {
    /// `Ready`, `Progressing`, `Degraded`.
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    #[serde(default)]
    pub replicas: i32,
    #[serde(default)]
    pub ready_replicas: i32,
    /// Accepted TopicPolicies compiled into this gateway's bundle.
    #[serde(default)]
    pub policies_applied: i32,
    /// Label selector of the pods, for the scale subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
}
