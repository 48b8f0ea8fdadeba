//! The gateway's readiness answer (`GET /readyz` on the admin port): the
//! kubelet reads the status code, the operator reads the body to see which
//! policy bundle each pod enforces (`PolicyApplied`).

use serde::{Deserialize, Serialize};

/// Why a gateway is or is not taking clients.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ReadyState {
    /// Serving.
    Ready,
    /// Stopping: clients are being moved to other pods.
    Draining,
    /// Cluster mode without a working NATS connection.
    EventBusUnavailable,
}

/// The JSON body of `/readyz` (200 when `state` is `ready`, 503 otherwise).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// Whether the gateway serves.
    pub state: ReadyState,
    /// [`crate::PolicyBundle::digest`] of the bundle in force.
    pub policy: String,
}
