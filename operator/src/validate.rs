//! Pure checks: which TopicPolicies of a gateway are accepted, and the
//! policy bundle they compile into.

use std::collections::BTreeMap;

use switchboard_config::{Pattern, PolicyBundle, TenantLimits, TenantPolicy};

use crate::crd::TopicPolicy;
use crate::crd::policy::PatternRule;

/// The outcome for one TopicPolicy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accepted,
    /// `reason` is the condition reason: `InvalidPattern`, `Conflict`, `GatewayNotFound`.
    Rejected {
        reason: &'static str,
        message: String,
    },
}

impl Verdict {
    pub fn is_accepted(&self) -> bool {
        matches!(self, Verdict::Accepted)
    }
}

fn rules(
    kind: &str,
    rules: &[PatternRule],
) -> Result<Vec<switchboard_config::PatternRule>, String> {
    rules
        .iter()
        .map(|r| {
            Pattern::parse(&r.pattern)
                .map(|pattern| switchboard_config::PatternRule {
                    pattern,
                    class: r.class,
                })
                .map_err(|e| format!("{kind} pattern {:?}: {e}", r.pattern))
        })
        .collect()
}

/// Compile one policy into the gateway's format, or say why it cannot be.
pub fn compile(policy: &TopicPolicy) -> Result<TenantPolicy, String> {
    let spec = &policy.spec;
    if !switchboard_config::policy::valid_tenant(&spec.tenant) {
        return Err(format!(
            "tenant {:?} must be 1-128 characters of [A-Za-z0-9_.:-]",
            spec.tenant
        ));
    }
    let positive = |v: Option<i64>, what: &str| -> Result<Option<u64>, String> {
        match v {
            Some(n) if n < 1 => Err(format!("{what} must be at least 1")),
            Some(n) => Ok(Some(n as u64)),
            None => Ok(None),
        }
    };
    Ok(TenantPolicy {
        subscribe: rules("subscribe", &spec.subscribe)?,
        publish: rules("publish", &spec.publish)?,
        client_publish: rules("clientPublish", &spec.client_publish)?,
        limits: TenantLimits {
            max_connections: positive(spec.limits.connections, "limits.connections")?,
            max_subscriptions_per_connection: positive(
                spec.limits.subscriptions_per_connection.map(i64::from),
                "limits.subscriptionsPerConnection",
            )?
            .map(|n| n.min(u32::MAX as u64) as u32),
            messages_per_minute: positive(
                spec.limits.messages_per_minute.map(i64::from),
                "limits.messagesPerMinute",
            )?
            .map(|n| n.min(u32::MAX as u64) as u32),
            max_message_bytes: None,
            max_presence_members: positive(
                spec.limits.presence_members.map(i64::from),
                "limits.presenceMembers",
            )?
            .map(|n| n.min(u32::MAX as u64) as u32),
        },
        history_retention_seconds: positive(
            spec.history_retention_seconds,
            "historyRetentionSeconds",
        )?,
        max_retention_days: positive(spec.max_retention_days, "maxRetentionDays")?
            .map(|n| n.min(u32::MAX as u64) as u32),
        residency: spec.residency.clone(),
    })
}

/// Judge every policy that names one gateway. Two policies claiming the same
/// tenant conflict: the older one (by creation time, then name) keeps the
/// tenant and the newer is rejected; nothing is merged.
///
/// A gateway no TopicPolicy names is open, as a gateway without a policy
/// file is: every tenant may use every topic of its own. Once any policy
/// names it, only accepted policies' tenants get in; a gateway whose
/// policies are all rejected stays closed rather than opening up.
pub fn judge(
    gateway_exists: bool,
    policies: &[TopicPolicy],
) -> (BTreeMap<String, Verdict>, PolicyBundle) {
    if policies.is_empty() {
        return (BTreeMap::new(), PolicyBundle::allow_all());
    }
    let mut verdicts = BTreeMap::new();
    let mut bundle = PolicyBundle::default();
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    let mut ordered: Vec<&TopicPolicy> = policies.iter().collect();
    ordered.sort_by(|a, b| {
        let key = |p: &TopicPolicy| {
            (
                p.metadata.creation_timestamp.clone().map(|t| t.0),
                p.metadata.name.clone(),
            )
        };
        key(a).cmp(&key(b))
    });
    for p in ordered {
        let name = p.metadata.name.clone().unwrap_or_default();
        let verdict = if !gateway_exists {
            Verdict::Rejected {
                reason: "GatewayNotFound",
                message: format!(
                    "RealtimeGateway {:?} does not exist in this namespace",
                    p.spec.gateway
                ),
            }
        } else {
            match compile(p) {
                Err(message) => Verdict::Rejected {
                    reason: "InvalidPattern",
                    message,
                },
                Ok(_) if owner.contains_key(&p.spec.tenant) => Verdict::Rejected {
                    reason: "Conflict",
                    message: format!(
                        "tenant {:?} is already claimed on gateway {:?} by TopicPolicy {:?}",
                        p.spec.tenant, p.spec.gateway, owner[&p.spec.tenant]
                    ),
                },
                Ok(compiled) => {
                    owner.insert(p.spec.tenant.clone(), name.clone());
                    bundle.tenants.insert(p.spec.tenant.clone(), compiled);
                    Verdict::Accepted
                }
            }
        };
        verdicts.insert(name, verdict);
    }
    (verdicts, bundle)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::TopicPolicySpec;
    use crate::crd::policy::PolicyLimits;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use switchboard_config::InteractionClass;

    pub fn policy(name: &str, tenant: &str, patterns: &[&str], created_secs: i64) -> TopicPolicy {
        let mut p = TopicPolicy::new(
            name,
            TopicPolicySpec {
                gateway: "gw".into(),
                tenant: tenant.into(),
                subscribe: patterns
                    .iter()
                    .map(|p| PatternRule {
                        pattern: p.to_string(),
                        class: InteractionClass::Stream,
                    })
                    .collect(),
                publish: vec![],
                client_publish: vec![],
                limits: PolicyLimits::default(),
                history_retention_seconds: None,
                max_retention_days: None,
                residency: Vec::new(),
            },
        );
        p.metadata.creation_timestamp = Some(Time(
            k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + created_secs).unwrap(),
        ));
        p
    }

    #[test]
    fn no_policy_means_open_and_only_rejected_ones_keep_it_closed() {
        let (verdicts, open) = judge(true, &[]);
        assert!(verdicts.is_empty());
        assert_eq!(open.digest(), PolicyBundle::allow_all().digest());
        let topic = switchboard_config::Topic::parse("deal.won").unwrap();
        assert!(open.check_publish("anyone", &topic).is_ok());
        let broken = serde_json::from_value::<TopicPolicy>(serde_json::json!({
            "apiVersion": "switchboard.dev/v1alpha1", "kind": "TopicPolicy",
            "metadata": {"name": "p", "namespace": "ns"},
            "spec": {"gateway": "rt", "tenant": "acme", "subscribe": [{"pattern": "a.>.b"}]}
        }))
        .unwrap();
        let (_, closed) = judge(true, &[broken]);
        assert!(closed.tenants.is_empty() && closed.default.is_none());
        assert!(closed.check_publish("acme", &topic).is_err());
    }

    #[test]
    fn accepted_invalid_and_conflicting() {
        let ps = vec![
            policy("b-newer", "acme", &["deal.*"], 10),
            policy("a-older", "acme", &["contact.*"], 5),
            policy("bad", "globex", &["a.>.b"], 1),
            policy("ok", "initech", &["x.*"], 1),
        ];
        let (v, bundle) = judge(true, &ps);
        assert_eq!(v["a-older"], Verdict::Accepted);
        assert!(
            matches!(&v["b-newer"], Verdict::Rejected { reason: "Conflict", message } if message.contains("a-older"))
        );
        assert!(
            matches!(&v["bad"], Verdict::Rejected { reason: "InvalidPattern", message } if message.contains("a.>.b"))
        );
        assert_eq!(v["ok"], Verdict::Accepted);
        assert_eq!(
            bundle.tenants.keys().collect::<Vec<_>>(),
            ["acme", "initech"]
        );
        assert_eq!(
            bundle.tenants["acme"].subscribe[0].pattern.as_str(),
            "contact.*"
        );
        assert!(bundle.default.is_none(), "unknown tenants are shut out");
    }

    #[test]
    fn every_compile_error_names_its_field() {
        let mut p = policy("p", "acme", &["deal.*"], 0);
        p.spec.tenant = "a b".into();
        assert!(compile(&p).unwrap_err().contains("tenant"));
        let mut p = policy("p", "acme", &["deal.*"], 0);
        p.spec.publish = vec![PatternRule {
            pattern: "x..y".into(),
            class: InteractionClass::Stream,
        }];
        assert!(
            compile(&p)
                .unwrap_err()
                .contains("publish pattern \"x..y\"")
        );
        let mut p = policy("p", "acme", &["deal.*"], 0);
        p.spec.limits.connections = Some(0);
        assert!(compile(&p).unwrap_err().contains("limits.connections"));
        let mut p = policy("p", "acme", &["deal.*"], 0);
        p.spec.limits.messages_per_minute = Some(-1);
        assert!(
            compile(&p)
                .unwrap_err()
                .contains("limits.messagesPerMinute")
        );
        let mut p = policy("p", "acme", &["deal.*"], 0);
        p.spec.history_retention_seconds = Some(0);
        assert!(compile(&p).unwrap_err().contains("historyRetentionSeconds"));
    }

    #[test]
    fn no_gateway_means_gateway_not_found() {
        let (v, bundle) = judge(false, &[policy("p", "acme", &["a"], 0)]);
        assert!(matches!(
            v["p"],
            Verdict::Rejected {
                reason: "GatewayNotFound",
                ..
            }
        ));
        assert!(bundle.tenants.is_empty());
    }
}
