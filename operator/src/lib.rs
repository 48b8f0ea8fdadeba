//! Switchboard operator: reconciles `RealtimeGateway` and `TopicPolicy`.
//!
//! - [`crd`]: the custom resources.
//! - [`validate`]: pure checks of policies (patterns, conflicts).
//! - [`build`]: pure functions from resources to Kubernetes objects.
//! - [`controller`]: read → validate → build → apply → status.
pub mod build;
pub mod controller;
pub mod crd;
pub mod lease;
pub mod metrics;
pub mod rollout;
pub mod validate;
