//! Reconcile one `TopicPolicy`: its `Accepted` condition. Policies of an
//! existing gateway are judged by the gateway's reconcile (conflicts need all
//! of them); this one reports policies whose gateway does not exist.

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};
use serde_json::json;

use super::{Context, Error, MANAGER, condition};
use crate::crd::{RealtimeGateway, TopicPolicy, TopicPolicyStatus};
use crate::rollout::Rollout;
use crate::validate::{self, Verdict};

/// Write the policy's `Accepted` condition; a rejection that is new (the
/// condition changed) is also a Warning Event on the policy, with the
/// condition's reason and message.
/// `PolicyApplied` follows the gateway's rollout for an accepted policy
/// (`rollout` is `None` when the gateway does not exist).
pub async fn set_accepted(
    ctx: &Context,
    p: &TopicPolicy,
    verdict: &Verdict,
    rollout: Option<&Rollout>,
) -> Result<(), Error> {
    let client = &ctx.client;
    let ns = p.namespace().ok_or(Error::NoNamespace)?;
    let previous = p.status.clone().unwrap_or_default().conditions;
    let (reason, message) = verdict.reason_message();
    let (applied, applied_reason, applied_message) = match (verdict, rollout) {
        (Verdict::Accepted, Some(r)) => {
            let (reason, message) = r.reason_message();
            (r.complete(), reason, message)
        }
        (Verdict::Accepted, None) => (false, "GatewayNotFound", "no gateway runs it".into()),
        (Verdict::Rejected { reason, .. }, _) => (
            false,
            "NotAccepted",
            format!("not in any policy bundle ({reason})"),
        ),
    };
    let status = TopicPolicyStatus {
        conditions: vec![
            condition(
                &previous,
                "Accepted",
                verdict.is_accepted(),
                reason,
                &message,
                p.metadata.generation,
            ),
            condition(
                &previous,
                "PolicyApplied",
                applied,
                applied_reason,
                &applied_message,
                p.metadata.generation,
            ),
        ],
        observed_generation: p.metadata.generation,
        gateway: Some(p.spec.gateway.clone()),
    };
    if p.status.as_ref().is_some_and(|s| {
        s.conditions == status.conditions
            && s.observed_generation == status.observed_generation
            && s.gateway == status.gateway
    }) {
        return Ok(());
    }
    if let Verdict::Rejected { reason, message } = verdict {
        super::gateway::publish_event(ctx, p, EventType::Warning, reason, message).await;
    }
    let body = json!({
        "apiVersion": TopicPolicy::api_version(&()),
        "kind": TopicPolicy::kind(&()),
        "status": status,
    });
    Api::<TopicPolicy>::namespaced(client.clone(), &ns)
        .patch_status(
            &p.name_any(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&body),
        )
        .await?;
    Ok(())
}

pub async fn reconcile(p: Arc<TopicPolicy>, ctx: Arc<Context>) -> Result<Action, Error> {
    let labels = vec![("kind", "TopicPolicy")];
    ctx.metrics.reconciles.get_or_create(&labels).inc();
    let ns = p.namespace().ok_or(Error::NoNamespace)?;
    let gateway = Api::<RealtimeGateway>::namespaced(ctx.client.clone(), &ns)
        .get_opt(&p.spec.gateway)
        .await?;
    if gateway.is_none() {
        let (verdicts, _) = validate::judge(false, std::slice::from_ref(p.as_ref()));
        if let Some(v) = verdicts.values().next() {
            set_accepted(&ctx, &p, v, None).await?;
        }
    }
    Ok(Action::requeue(ctx.resync))
}

pub fn error_policy(p: Arc<TopicPolicy>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics
        .failures
        .get_or_create(&vec![("kind", "TopicPolicy")])
        .inc();
    tracing::warn!(policy = %p.name_any(), error = %error, "reconcile failed");
    Action::requeue(Duration::from_secs(30))
}
