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
    /// `Some(ns)`: watch and manage only namespace `ns` (the chart's
    /// `operator.scope: namespace`, with Roles instead of ClusterRoles);
    /// `None`: every namespace.
    pub watch_namespace: Option<String>,
}

/// The label every object the operator applies carries; watches of owned
/// kinds select on it, so the operator caches its own objects only, not
/// every Deployment, ConfigMap and Service of the cluster.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by=switchboard-operator";

/// An `Api` over the namespaces the operator watches.
pub fn scoped<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
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
pub async fn run(ctx: Arc<Context>, shutdown: impl Future<Output = ()> + Send + Sync + 'static) {
    let client = ctx.client.clone();
    let ns = ctx.watch_namespace.clone();
    let ns = ns.as_deref();
    let cfg = watcher::Config::default();
    let owned = watcher::Config::default().labels(MANAGED_BY);
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = tx.send(true);
    });
    let stop = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let gateways = Controller::new(scoped::<RealtimeGateway>(&client, ns), cfg.clone())
        .owns(scoped::<Deployment>(&client, ns), owned.clone())
        .owns(scoped::<ConfigMap>(&client, ns), owned.clone())
        .owns(scoped::<Service>(&client, ns), owned.clone())
        .owns(scoped::<ServiceAccount>(&client, ns), owned.clone())
        .owns(scoped::<PodDisruptionBudget>(&client, ns), owned.clone())
        .owns(scoped::<HorizontalPodAutoscaler>(&client, ns), owned)
        // A policy concerns its gateway and, until judged again, the gateway
        // it was judged for: retargeting it removes it from the old one at once.
        .watches(scoped::<TopicPolicy>(&client, ns), cfg.clone(), |p| {
            let ns = p.namespace().unwrap_or_default();
            let previous = p
                .status
                .as_ref()
                .and_then(|s| s.gateway.clone())
                .filter(|g| *g != p.spec.gateway);
            std::iter::once(p.spec.gateway.clone())
                .chain(previous)
                .map(move |g| ObjectRef::new(&g).within(&ns))
        })
        .graceful_shutdown_on(stop(rx.clone()))
        .run(gateway::reconcile, gateway::error_policy, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "gateway controller");
            }
        });
    let policies = Controller::new(scoped::<TopicPolicy>(&client, ns), cfg)
        .graceful_shutdown_on(stop(rx))
        .run(policy::reconcile, policy::error_policy, ctx)
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "policy controller");
            }
        });
    tokio::join!(gateways, policies);
}
