//! The custom resources (group `switchboard.dev`, version `v1alpha1`).

pub mod gateway;
pub mod policy;

pub use gateway::{RealtimeGateway, RealtimeGatewaySpec, RealtimeGatewayStatus};
pub use policy::{TopicPolicy, TopicPolicySpec, TopicPolicyStatus};

use kube::CustomResourceExt;

/// Every CRD of the operator, as YAML documents (what `crdgen` prints and
/// `crds/` holds).
pub fn crds_yaml() -> String {
    let docs = [RealtimeGateway::crd(), TopicPolicy::crd()];
    docs.iter()
        .map(|crd| serde_saphyr::to_string(crd).unwrap_or_default())
        .map(|y| format!("---\n{y}"))
        .collect()
}

/// A reference to one key of a Secret in the resource's namespace.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretKeyRef {
    pub name: String,
    pub key: String,
}
