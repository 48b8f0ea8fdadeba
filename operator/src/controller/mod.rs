//! The controllers: `RealtimeGateway` (read → validate → build → apply →
//! status) and `TopicPolicy` (reports policies whose gateway is missing).

pub mod gateway;
pub mod policy;

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::runtime::controller::Controller;
use kube::runtime::events::Recorder;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};

use crate::crd::{RealtimeGateway, TopicPolicy};
use crate::metrics::Metrics;

/// The field manager of every server-side apply.
pub const MANAGER: &str = "switchboard-operator";
/// The field manager that holds a Deployment's `spec.replicas` while the
/// operator hands the count over to a HorizontalPodAutoscaler.
pub const HANDOVER_MANAGER: &str = "switchboard-operator-handover";
/// Every object is looked at again this often, even without changes.
pub const RESYNC: Duration = Duration::from_secs(300);

/// What a reconciliation sees.
pub struct Context {
    pub client: Client,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub default_image: String,
    /// How often every object is reconciled again without a change
    /// ([`RESYNC`] in production). Secrets are read, not watched, so this
    /// bounds how long a changed Secret takes to roll the pods.
    pub resync: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("{0}")]
    Build(#[from] crate::build::BuildError),
    #[error("the object has no namespace")]
    NoNamespace,
    #[error("serializing an object: {0}")]
    Serialize(#[from] serde_json::Error),
}

/// A standard condition; keeps the transition time when nothing changed.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let since = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| Time(k8s_openapi::jiff::Timestamp::now()));
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time: since,
    }
}

/// Run both controllers until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let cfg = watcher::Config::default();
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    let stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let gateways = Controller::new(Api::<RealtimeGateway>::all(client.clone()), cfg.clone())
        .owns(Api::<Deployment>::all(client.clone()), cfg.clone())
        .owns(Api::<ConfigMap>::all(client.clone()), cfg.clone())
        .owns(Api::<Service>::all(client.clone()), cfg.clone())
        .owns(Api::<ServiceAccount>::all(client.clone()), cfg.clone())
        .owns(Api::<PodDisruptionBudget>::all(client.clone()), cfg.clone())
        .owns(
            Api::<HorizontalPodAutoscaler>::all(client.clone()),
            cfg.clone(),
        )
        .watches(Api::<TopicPolicy>::all(client.clone()), cfg.clone(), |p| {
            p.namespace()
                .map(|ns| ObjectRef::new(&p.spec.gateway).within(&ns))
        })
        .graceful_shutdown_on(stop(rx.clone()))
        .run(gateway::reconcile, gateway::error_policy, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "gateway controller");
            }
        });
    let policies = Controller::new(Api::<TopicPolicy>::all(client.clone()), cfg)
        .graceful_shutdown_on(stop(rx))
        .run(policy::reconcile, policy::error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "policy controller");
            }
        });
    tokio::join!(gateways, policies);
}
