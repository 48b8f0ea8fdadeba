//! `TopicPolicy`: one tenant's allowlist on one gateway.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};
use switchboard_config::InteractionClass;

/// One tenant's subscribe/publish allowlist and limits on one gateway.
// Several printcolumns repeat `type_`: not a duplicated attribute.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "switchboard.dev",
    version = "v1alpha1",
    kind = "TopicPolicy",
    namespaced,
    status = "TopicPolicyStatus",
    shortname = "tpol",
    category = "switchboard",
    // Helm keeps CRDs (and so every custom resource) when a release is uninstalled.
    annotation("helm.sh/resource-policy", "keep"),
    printcolumn(name = "Tenant", type_ = "string", json_path = ".spec.tenant"),
    printcolumn(name = "Gateway", type_ = "string", json_path = ".spec.gateway"),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].reason"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TopicPolicySpec {
    /// Name of the RealtimeGateway (same namespace) this policy applies to.
    #[schemars(length(min = 1, max = 253))]
    pub gateway: String,
    /// The tenant (the token's tenant claim): 1-128 characters of `[A-Za-z0-9_.:-]`.
    #[schemars(length(min = 1, max = 128), regex(pattern = r"^[A-Za-z0-9_.:-]+$"))]
    pub tenant: String,
    /// Patterns this tenant's connections may subscribe to (at most 256).
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub subscribe: Vec<PatternRule>,
    /// Topics this tenant's publishers may publish to (at most 256).
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub publish: Vec<PatternRule>,
    /// Topics this tenant's connections may publish to themselves, over the
    /// socket (at most 256); empty: clients may not publish.
    #[serde(default)]
    #[schemars(length(max = 256))]
    pub client_publish: Vec<PatternRule>,
    #[serde(default)]
    pub limits: PolicyLimits,
    /// How long this tenant's events stay replayable, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub history_retention_seconds: Option<i64>,
    /// The longest `gdpr_context.retention_days` an event may ask for; events
    /// asking for more, or nothing, are kept this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 36500))]
    pub max_retention_days: Option<i64>,
    /// Regions this tenant's data may live in (empty: any). Its events are
    /// stored only there and never sourced to other regions; its clients and
    /// publishers are refused elsewhere.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 16),
        inner(length(min = 1, max = 64), regex(pattern = r"^[A-Za-z0-9_-]+$"))
    )]
    pub residency: Vec<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PatternRule {
    /// Dot-separated tokens of `[A-Za-z0-9_:/-]` (at most 255 characters and 16 tokens);
    /// `*` matches one token; a trailing `*` or `>` matches the rest.
    #[schemars(
        length(min = 1, max = 255),
        regex(pattern = r"^(([A-Za-z0-9_:/-]+|[*])([.]([A-Za-z0-9_:/-]+|[*]))*([.]>)?|>)$")
    )]
    pub pattern: String,
    /// Interaction class (seed 002): presence (A), stream (B), interactive (C), critical (D: no realtime).
    #[serde(default)]
    pub class: InteractionClass,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyLimits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub connections: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub subscriptions_per_connection: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub messages_per_minute: Option<i32>,
    /// Presence members listed per topic; above it, presence sends counts only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub presence_members: Option<i32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopicPolicyStatus {
    /// `Accepted` (reasons: `Accepted`, `Conflict`, `InvalidPattern`, `GatewayNotFound`).
    #[serde(default)]
    pub conditions: Vec<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The gateway this policy was last judged for: when `spec.gateway`
    /// changes, that gateway is reconciled at once and drops the policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
}
