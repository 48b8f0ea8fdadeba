//! Reconcile one `RealtimeGateway`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::{Context, Error, HANDOVER_MANAGER, MANAGER, condition};
use crate::build;
use crate::rollout::{self, Rollout};

/// How soon a gateway whose pods still run an older bundle is looked at again.
const ROLLOUT_RECHECK: Duration = Duration::from_secs(5);
use crate::crd::{RealtimeGateway, RealtimeGatewayStatus, TopicPolicy};
use crate::validate::{self, Verdict};

/// Server-side apply of one object under the operator's field manager.
pub async fn apply<K>(client: &kube::Client, ns: &str, obj: &K) -> Result<K, Error>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Serialize
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    let mut body = serde_json::to_value(obj)?;
    if let Some(m) = body.as_object_mut() {
        m.insert("apiVersion".into(), K::api_version(&()).into());
        m.insert("kind".into(), K::kind(&()).into());
    }
    Ok(api
        .patch(
            &obj.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?)
}

/// Whether `manager` applied `spec.replicas` of this Deployment.
fn applies_replicas(deployment: &Deployment, manager: &str) -> bool {
    deployment
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter(|e| {
            e.manager.as_deref() == Some(manager) && e.operation.as_deref() == Some("Apply")
        })
        .filter_map(|e| e.fields_v1.as_ref())
        .any(|f| f.0.pointer("/f:spec/f:replicas").is_some())
}

/// Before the operator stops applying `spec.replicas` (autoscaling was
/// switched on), a second field manager applies the live count, clamped to
/// the HPA's bounds. Server-side apply removes a field its only manager
/// stops applying, and a Deployment without `replicas` is defaulted to 1:
/// without the handover, switching to autoscaling would scale the gateway
/// down to one pod until the HPA reacts. The HPA's later updates take the
/// field from the handover manager.
async fn hand_over_replicas(
    client: &kube::Client,
    ns: &str,
    name: &str,
    hpa: &HorizontalPodAutoscaler,
) -> Result<(), Error> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), ns);
    let Some(live) = api.get_opt(name).await? else {
        return Ok(());
    };
    if !applies_replicas(&live, MANAGER) {
        return Ok(());
    }
    let current = live.spec.replicas.unwrap_or(1);
    let min = hpa.spec.min_replicas.unwrap_or(1);
    let replicas = current.clamp(min, hpa.spec.max_replicas.max(min));
    let body = json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {"replicas": replicas},
    });
    api.patch(
        name,
        &PatchParams::apply(HANDOVER_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

pub async fn reconcile(gw: Arc<RealtimeGateway>, ctx: Arc<Context>) -> Result<Action, Error> {
    let started = Instant::now();
    let labels = vec![("kind", "RealtimeGateway")];
    ctx.metrics.reconciles.get_or_create(&labels).inc();
    let result = reconcile_inner(&gw, &ctx).await;
    ctx.metrics
        .duration
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    result
}

async fn reconcile_inner(gw: &RealtimeGateway, ctx: &Context) -> Result<Action, Error> {
    let ns = gw.namespace().ok_or(Error::NoNamespace)?;
    let name = gw.name_any();
    let client = &ctx.client;
    let generation = gw.metadata.generation;
    let previous = gw.status.clone().unwrap_or_default().conditions;

    // read
    let mine: Vec<TopicPolicy> = Api::<TopicPolicy>::namespaced(client.clone(), &ns)
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|p| p.spec.gateway == name)
        .collect();
    // validate
    let (verdicts, bundle) = validate::judge(true, &mine);
    // build
    let mut objects = match build::build(gw, &bundle, &ctx.default_image) {
        Ok(o) => o,
        Err(e) => {
            let message = e.to_string();
            publish_event(ctx, gw, EventType::Warning, "InvalidSpec", &message).await;
            let status = RealtimeGatewayStatus {
                conditions: vec![
                    condition(
                        &previous,
                        "Ready",
                        false,
                        "InvalidSpec",
                        &message,
                        generation,
                    ),
                    condition(
                        &previous,
                        "Progressing",
                        false,
                        "InvalidSpec",
                        &message,
                        generation,
                    ),
                    condition(
                        &previous,
                        "Degraded",
                        true,
                        "InvalidSpec",
                        &message,
                        generation,
                    ),
                ],
                observed_generation: generation,
                selector: Some(build::selector_string(gw)),
                ..gw.status.clone().unwrap_or_default()
            };
            patch_gateway_status(client, &ns, &name, &status).await?;
            return Ok(Action::requeue(ctx.resync));
        }
    };
    if let Some(digest) = secrets_digest(ctx, gw, &ns).await? {
        objects.roll_on_secrets(&digest);
    }
    // apply
    apply(client, &ns, &objects.service_account).await?;
    apply(client, &ns, &objects.config_map).await?;
    // With autoscaling, the HPA exists before the Deployment stops carrying
    // a replica count, and the live count is handed over first (see
    // `hand_over_replicas`); without, the count is the operator's again
    // before the HPA goes.
    if let Some(hpa) = &objects.hpa {
        apply(client, &ns, hpa).await?;
        hand_over_replicas(client, &ns, &name, hpa).await?;
    }
    let deployment = apply(client, &ns, &objects.deployment).await?;
    apply(client, &ns, &objects.service).await?;
    apply(client, &ns, &objects.pdb).await?;
    if objects.hpa.is_none() {
        let api: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &ns);
        match api.delete(&name, &DeleteParams::default()).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }

    // rollout: which bundle the ready pods enforce
    let rollout = rollout::observe(client, gw, &bundle.digest()).await?;
    // status: policies
    for p in &mine {
        let Some(verdict) = verdicts.get(&p.name_any()) else {
            continue;
        };
        super::policy::set_accepted(ctx, p, verdict, Some(&rollout)).await?;
    }
    // status: gateway
    let rejected: Vec<String> = verdicts
        .iter()
        .filter(|(_, v)| !v.is_accepted())
        .map(|(n, _)| n.clone())
        .collect();
    let status = gateway_status(
        gw,
        &deployment,
        &previous,
        verdicts.values().filter(|v| v.is_accepted()).count(),
        &rejected,
        &rollout,
    );
    patch_gateway_status(client, &ns, &name, &status).await?;
    // While pods lag, look again soon: the rollout takes about a minute.
    Ok(Action::requeue(if rollout.complete() {
        ctx.resync
    } else {
        ctx.resync.min(ROLLOUT_RECHECK)
    }))
}

/// A digest of the content of every Secret key the gateway mounts (`None`
/// when it mounts none). A missing Secret or key hashes as missing, so the
/// pods roll when it appears, and is reported as a Warning Event (the pods
/// cannot start without it).
async fn secrets_digest(
    ctx: &Context,
    gw: &RealtimeGateway,
    ns: &str,
) -> Result<Option<String>, Error> {
    let refs = build::secret_refs(gw);
    if refs.is_empty() {
        return Ok(None);
    }
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), ns);
    let mut text = String::new();
    for r in refs {
        let value = api
            .get_opt(&r.name)
            .await?
            .and_then(|s| s.data)
            .and_then(|mut d| d.remove(&r.key));
        match value {
            Some(bytes) => text.push_str(&format!(
                "{}/{}={}\n",
                r.name,
                r.key,
                build::sha256_bytes(&bytes.0)
            )),
            None => {
                let note = format!(
                    "Secret {}/{} has no key {:?}: the gateway pods cannot start until it exists",
                    ns, r.name, r.key
                );
                publish_event(ctx, gw, EventType::Warning, "SecretNotFound", &note).await;
                text.push_str(&format!("{}/{} missing\n", r.name, r.key));
            }
        }
    }
    Ok(Some(build::sha256(&text)))
}

/// The status a gateway has, given its Deployment.
pub fn gateway_status(
    gw: &RealtimeGateway,
    deployment: &Deployment,
    previous: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    accepted: usize,
    rejected: &[String],
    rollout: &Rollout,
) -> RealtimeGatewayStatus {
    let generation = gw.metadata.generation;
    let desired = deployment.spec.replicas.unwrap_or(1);
    let st = deployment.status.clone().unwrap_or_default();
    let ready = st.ready_replicas.unwrap_or(0);
    let updated = st.updated_replicas.unwrap_or(0);
    let observed = st.observed_generation >= deployment.metadata.generation;
    let rolled = observed && updated >= desired && st.replicas.unwrap_or(0) <= desired;
    let is_ready = rolled && ready >= desired && desired > 0;
    let ready_msg = format!("{ready}/{desired} pods ready");
    let degraded_msg = if rejected.is_empty() {
        "all TopicPolicies accepted".to_owned()
    } else {
        format!("TopicPolicies not accepted: {}", rejected.join(", "))
    };
    RealtimeGatewayStatus {
        conditions: vec![
            condition(
                previous,
                "Ready",
                is_ready,
                if is_ready {
                    "PodsReady"
                } else {
                    "PodsNotReady"
                },
                &ready_msg,
                generation,
            ),
            condition(
                previous,
                "Progressing",
                !rolled,
                if rolled {
                    "RolloutComplete"
                } else {
                    "RollingOut"
                },
                &ready_msg,
                generation,
            ),
            condition(
                previous,
                "Degraded",
                !rejected.is_empty(),
                if rejected.is_empty() {
                    "AsExpected"
                } else {
                    "PoliciesRejected"
                },
                &degraded_msg,
                generation,
            ),
            {
                let (reason, message) = rollout.reason_message();
                condition(
                    previous,
                    "PolicyApplied",
                    rollout.complete(),
                    reason,
                    &message,
                    generation,
                )
            },
        ],
        observed_generation: generation,
        replicas: st.replicas.unwrap_or(0),
        ready_replicas: ready,
        policies_applied: accepted as i32,
        selector: Some(build::selector_string(gw)),
    }
}

async fn patch_gateway_status(
    client: &kube::Client,
    ns: &str,
    name: &str,
    status: &RealtimeGatewayStatus,
) -> Result<(), Error> {
    let api: Api<RealtimeGateway> = Api::namespaced(client.clone(), ns);
    let body = json!({
        "apiVersion": RealtimeGateway::api_version(&()),
        "kind": RealtimeGateway::kind(&()),
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

pub(crate) async fn publish_event<K: Resource<DynamicType = ()>>(
    ctx: &Context,
    obj: &K,
    type_: EventType,
    reason: &str,
    note: &str,
) {
    let event = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&event, &obj.object_ref(&())).await {
        tracing::warn!(error = %e, "cannot publish a Kubernetes event");
    }
}

pub fn error_policy(gw: Arc<RealtimeGateway>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .failures
        .get_or_create(&vec![("kind", "RealtimeGateway")])
        .inc();
    tracing::warn!(gateway = %gw.name_any(), error = %error, "reconcile failed");
    let note = error.to_string();
    tokio::spawn(async move {
        publish_event(
            &ctx,
            gw.as_ref(),
            EventType::Warning,
            "ReconcileFailed",
            &note,
        )
        .await;
    });
    Action::requeue(Duration::from_secs(30))
}

impl Verdict {
    /// Condition reason and message.
    pub fn reason_message(&self) -> (&'static str, String) {
        match self {
            Verdict::Accepted => (
                "Accepted",
                "compiled into the gateway's policy bundle".into(),
            ),
            Verdict::Rejected { reason, message } => (reason, message.clone()),
        }
    }
}
