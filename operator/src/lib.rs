//! Switchboard operator: reconciles `RealtimeGateway` and `TopicPolicy`.
//!
//! - [`crd`]: the custom resources.
//! - [`validate`]: pure checks of policies (patterns, conflicts).
//! - [`build`]: pure functions from resources to Kubernetes objects.
//! - [`controller`]: read → validate → build → apply → status.
#![allow(
    missing_docs,
    reason = "the CRD types' field docs become schema descriptions (kubectl explain): adding them regenerates the CRDs and their goldens, a change of its own; the fields are documented in docs/operator.md"
)]
pub mod build;
pub mod controller;
pub mod crd;
pub mod lease;
pub mod metrics;
pub mod rollout;
pub mod validate;
