//! The tenant policy bundle: which tenant may subscribe and publish to what,
//! and with which limits. The operator compiles `TopicPolicy` resources into
//! one bundle per gateway; the gateway hot-reloads it.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::{FormatError, Limits, Pattern, Topic};

/// The policy of every tenant on one gateway.
///
/// A tenant listed in `tenants` gets exactly that policy. A tenant not listed
/// gets `default` when it is set, and is refused when it is not: once a bundle
/// lists tenants, unknown tenants are shut out. No bundle at all (no
/// `policy_file`) means "everything allowed", see [`PolicyBundle::allow_all`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields, rename_all = "snake_case")]
pub struct PolicyBundle {
    /// Policies by tenant name.
    pub tenants: BTreeMap<String, TenantPolicy>,
    /// The policy of tenants not named in `tenants` (none: they are refused).
    pub default: Option<TenantPolicy>,
}

/// One tenant's allowlist and limits.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields, rename_all = "snake_case")]
pub struct TenantPolicy {
    /// Patterns connections of this tenant may subscribe to. A subscription
    /// must be covered by one of them (`deal.stage.*` is covered by `deal.*`).
    pub subscribe: Vec<PatternRule>,
    /// Topics this tenant's publishers may publish to.
    pub publish: Vec<PatternRule>,
    /// Topics this tenant's client connections may publish to (a separate
    /// allowlist from backends'; `critical` topics never).
    pub client_publish: Vec<PatternRule>,
    /// Limits below the gateway's.
    pub limits: TenantLimits,
    /// How long this tenant's events stay replayable, in seconds (at most
    /// the gateway's own retention).
    pub history_retention_seconds: Option<u64>,
    /// The longest `gdpr_context.retention_days` an event of this tenant may
    /// ask for; events asking for more (or nothing) are kept this long.
    pub max_retention_days: Option<u32>,
    /// Regions this tenant's data may live in (empty: any). Its events are
    /// stored only in these regions' streams and never sourced to others;
    /// publishing for it or connecting its clients elsewhere is refused.
    pub residency: Vec<String>,
}

/// A pattern and the interaction class of the topics it names.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub struct PatternRule {
    /// Topics this rule covers.
    pub pattern: Pattern,
    #[serde(default)]
    /// How the topics may be used (`critical` topics are never delivered by a wider pattern).
    pub class: InteractionClass,
}

/// The interaction classes of seed 002 (A–D).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum InteractionClass {
    /// A: live presence, optional.
    Presence,
    /// B: event streaming, with replay and fallbacks.
    #[default]
    Stream,
    /// C: low-latency interactions.
    Interactive,
    /// D: critical transactions: realtime is not allowed. Subscriptions and
    /// realtime publishes on these topics are refused.
    Critical,
}

/// Per-tenant limits; unset fields fall back to the gateway's [`Limits`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields, rename_all = "snake_case")]
pub struct TenantLimits {
    /// Connections this tenant may hold on one gateway process.
    pub max_connections: Option<u64>,
    /// At most this many subscriptions per connection.
    pub max_subscriptions_per_connection: Option<u32>,
    /// Client messages per minute per connection.
    pub messages_per_minute: Option<u32>,
    /// Largest client message or published event, in bytes.
    pub max_message_bytes: Option<u64>,
    /// Members listed per presence topic; above it, presence sends counts only.
    pub max_presence_members: Option<u32>,
}

/// Why a tenant may not do something.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("tenant has no policy on this gateway")]
    /// The tenant has no policy here.
    UnknownTenant,
    #[error("{0:?} is not allowed by the tenant's policy")]
    /// The pattern or topic is not in the tenant's allowlist.
    NotAllowed(String),
    #[error("{0:?} is a critical topic: realtime delivery is not allowed")]
    /// A wider pattern would reach a `critical` topic.
    Critical(String),
}

/// Limits in force for one tenant, gateway defaults merged with its policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EffectiveLimits {
    /// Connections of the tenant on one gateway (none: only the gateway's limit).
    pub max_connections: Option<u64>,
    /// Subscriptions per connection.
    pub max_subscriptions_per_connection: u32,
    /// Client messages per minute per connection.
    pub messages_per_minute: u32,
    /// Largest client message or published event, in bytes.
    pub max_message_bytes: u64,
    /// Members listed per presence topic; above it, counts only.
    pub max_presence_members: u32,
}

impl PolicyBundle {
    /// The policy used when no policy file is configured: one default that
    /// allows every topic.
    pub fn allow_all() -> Self {
        let all = Pattern::parse(">").ok();
        let rules: Vec<PatternRule> = all
            .into_iter()
            .map(|pattern| PatternRule {
                pattern,
                class: InteractionClass::Stream,
            })
            .collect();
        Self {
            tenants: BTreeMap::new(),
            default: Some(TenantPolicy {
                subscribe: rules.clone(),
                publish: rules.clone(),
                client_publish: rules,
                ..TenantPolicy::default()
            }),
        }
    }

    /// Parse a policy bundle (YAML or JSON) and check it. An empty text is
    /// refused rather than read as a bundle with no tenants: it is what a
    /// reader sees in the middle of a rewrite, and applying it would close
    /// every tenant's connections.
    pub fn from_yaml(text: &str) -> Result<Self, FormatError> {
        if text.trim().is_empty() {
            return Err(FormatError::Invalid {
                what: "policy bundle",
                problems: vec!["it is empty (to refuse every tenant, write `tenants: {}`)".into()],
            });
        }
        let bundle: Self = crate::parse_yaml("policy bundle", text)?;
        bundle.validate()?;
        Ok(bundle)
    }

    /// The bundle as YAML (what `from_yaml` reads back).
    pub fn to_yaml(&self) -> String {
        serde_saphyr::to_string(self).unwrap_or_default()
    }

    /// SHA-256 (hex) of the canonical serialization: the same bundle has the
    /// same digest on the operator that wrote it and on every gateway that
    /// read it back, whatever the file's formatting.
    pub fn digest(&self) -> String {
        use sha2::{Digest, Sha256};
        Sha256::digest(self.to_yaml().as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// Check every tenant name and pattern; every problem is listed.
    pub fn validate(&self) -> Result<(), FormatError> {
        let mut problems: Vec<String> = self
            .tenants
            .keys()
            .filter(|t| !valid_tenant(t))
            .map(|t| format!("tenant {t:?} must be 1-128 characters of [A-Za-z0-9_.:-]"))
            .collect();
        let named = self.tenants.iter().map(|(t, p)| (t.as_str(), p));
        for (tenant, policy) in named.chain(self.default.iter().map(|p| ("(default)", p))) {
            for region in policy.residency.iter().filter(|r| !crate::valid_region(r)) {
                problems.push(format!(
                    "tenant {tenant:?}: residency region {region:?}: {}",
                    crate::gateway::REGION_RULE
                ));
            }
            if policy.max_retention_days == Some(0) {
                problems.push(format!(
                    "tenant {tenant:?}: max_retention_days must be at least 1"
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(FormatError::Invalid {
                what: "policy bundle",
                problems,
            })
        }
    }

    /// Whether `tenant`'s data may live in `region` (its policy's
    /// `residency`; a tenant without one may live anywhere). A tenant
    /// without a policy is not resident anywhere.
    pub fn resident_in(&self, tenant: &str, region: &str) -> bool {
        self.tenant(tenant)
            .is_ok_and(|p| p.residency.is_empty() || p.residency.iter().any(|r| r == region))
    }

    /// Whether `tenant` is pinned to regions (its events must never leave them).
    pub fn pinned(&self, tenant: &str) -> bool {
        self.tenant(tenant).is_ok_and(|p| !p.residency.is_empty())
    }

    /// The policy that applies to `tenant`.
    pub fn tenant(&self, tenant: &str) -> Result<&TenantPolicy, Denied> {
        self.tenants
            .get(tenant)
            .or(self.default.as_ref())
            .ok_or(Denied::UnknownTenant)
    }

    /// May `tenant` subscribe to `pattern`?
    pub fn check_subscribe(&self, tenant: &str, pattern: &Pattern) -> Result<(), Denied> {
        self.tenant(tenant)?
            .check(&self.tenant(tenant)?.subscribe, pattern)
    }

    /// A topic marked critical anywhere in the tenant's policy (publish or
    /// subscribe rules) is never published through the realtime gateway:
    /// class D has no realtime path at all.
    pub fn check_publish(&self, tenant: &str, topic: &Topic) -> Result<(), Denied> {
        let policy = self.tenant(tenant)?;
        self.check_publish_with(policy, &policy.publish, topic)
    }

    fn check_publish_with(
        &self,
        policy: &TenantPolicy,
        rules: &[PatternRule],
        topic: &Topic,
    ) -> Result<(), Denied> {
        if let Some(rule) = policy
            .subscribe
            .iter()
            .chain(&policy.publish)
            .find(|r| r.class == InteractionClass::Critical && r.pattern.matches(topic))
        {
            return Err(Denied::Critical(rule.pattern.to_string()));
        }
        match Pattern::parse(topic.as_str()) {
            Ok(p) => policy.check(rules, &p),
            Err(_) => Err(Denied::NotAllowed(topic.to_string())),
        }
    }

    /// Is `topic` a presence topic of `tenant`: named `presence:<resource>`
    /// (seed 004) or of class `presence` in the subscribe rules (seed 002's
    /// class A)?
    pub fn is_presence(&self, tenant: &str, topic: &Topic) -> bool {
        topic
            .tokens()
            .next()
            .is_some_and(|t| t.starts_with("presence:") && t.len() > "presence:".len())
            || self.tenant(tenant).is_ok_and(|p| {
                p.subscribe
                    .iter()
                    .any(|r| r.class == InteractionClass::Presence && r.pattern.matches(topic))
            })
    }

    /// The subscribe patterns of `tenant` a subscription may name as they
    /// are (its rules that reach no `critical` topic); empty for an unknown
    /// tenant.
    pub fn subscribable(&self, tenant: &str) -> Vec<Pattern> {
        let Ok(policy) = self.tenant(tenant) else {
            return Vec::new();
        };
        policy
            .subscribe
            .iter()
            .filter(|r| r.class != InteractionClass::Critical)
            .map(|r| r.pattern.clone())
            .filter(|p| self.check_subscribe(tenant, p).is_ok())
            .collect()
    }

    /// May a client connection of `tenant` publish on `topic`? As for
    /// backends, against the `client_publish` allowlist.
    pub fn check_client_publish(&self, tenant: &str, topic: &Topic) -> Result<(), Denied> {
        let policy = self.tenant(tenant)?;
        self.check_publish_with(policy, &policy.client_publish, topic)
    }

    /// The limits of `tenant`: its policy's, within the gateway's `defaults`.
    pub fn limits(&self, tenant: &str, defaults: &Limits) -> Result<EffectiveLimits, Denied> {
        let l = &self.tenant(tenant)?.limits;
        Ok(EffectiveLimits {
            max_connections: l.max_connections,
            max_subscriptions_per_connection: l
                .max_subscriptions_per_connection
                .unwrap_or(defaults.max_subscriptions_per_connection),
            messages_per_minute: l
                .messages_per_minute
                .unwrap_or(defaults.messages_per_minute),
            max_message_bytes: l.max_message_bytes.unwrap_or(defaults.max_message_bytes),
            max_presence_members: l
                .max_presence_members
                .unwrap_or(defaults.max_presence_members),
        })
    }
}

impl TenantPolicy {
    fn check(&self, rules: &[PatternRule], pattern: &Pattern) -> Result<(), Denied> {
        // A critical rule sharing any topic with the request wins: realtime
        // is never allowed there, even when a broader rule would allow it.
        // Overlap, not containment: `*.captured` reaches `payment.captured`.
        if let Some(rule) = rules
            .iter()
            .find(|r| r.class == InteractionClass::Critical && pattern.overlaps(&r.pattern))
        {
            return Err(Denied::Critical(rule.pattern.to_string()));
        }
        if rules.iter().any(|r| pattern.is_covered_by(&r.pattern)) {
            Ok(())
        } else {
            Err(Denied::NotAllowed(pattern.to_string()))
        }
    }
}

/// Tenant names are embedded in NATS subjects and metric labels, so they are
/// restricted to a safe alphabet.
pub fn valid_tenant(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 128
        && t.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUNDLE: &str = r#"
tenants:
  acme:
    subscribe:
      - pattern: "deal.*"
      - pattern: "payment.>"
        class: critical
    publish:
      - pattern: "deal.>"
    limits:
      max_subscriptions_per_connection: 3
"#;

    fn pat(s: &str) -> Pattern {
        Pattern::parse(s).unwrap()
    }

    #[test]
    fn the_digest_survives_the_round_trip_through_a_file_and_tells_bundles_apart() {
        let hand_written = PolicyBundle::from_yaml(BUNDLE).unwrap();
        let written = hand_written.to_yaml();
        let read_back = PolicyBundle::from_yaml(&written).unwrap();
        assert_eq!(read_back.digest(), hand_written.digest());
        assert_eq!(read_back.digest().len(), 64);
        let other = PolicyBundle::from_yaml(&BUNDLE.replace("deal.*", "deal.>")).unwrap();
        assert_ne!(other.digest(), hand_written.digest());
        assert_ne!(
            PolicyBundle::allow_all().digest(),
            PolicyBundle::default().digest()
        );
    }

    #[test]
    fn critical_topics_are_unreachable_through_overlapping_patterns_and_unpublishable() {
        let b = PolicyBundle::from_yaml(
            "tenants:\n  acme:\n    subscribe:\n      - pattern: \">\"\n      - pattern: \"payment.>\"\n        class: critical\n    publish:\n      - pattern: \">\"\n",
        )
        .unwrap();
        for overlapping in ["*.captured", "*.*.refunded", "*.>", "payment.*", ">"] {
            assert!(
                matches!(
                    b.check_subscribe("acme", &pat(overlapping)),
                    Err(Denied::Critical(_))
                ),
                "{overlapping}"
            );
        }
        for clear in ["deal.*", "*.*.*.*.x", "deal.>"] {
            // `*.*.*.*.x` can still be `payment.a.b.c.x`: only truly
            // disjoint patterns pass.
            let verdict = b.check_subscribe("acme", &pat(clear));
            assert_eq!(
                verdict.is_ok(),
                !pat(clear).overlaps(&pat("payment.>")),
                "{clear}: {verdict:?}"
            );
        }
        assert!(b.check_subscribe("acme", &pat("deal.*")).is_ok());
        // Critical under subscribe: not publishable either.
        let topic = Topic::parse("payment.captured").unwrap();
        assert!(matches!(
            b.check_publish("acme", &topic),
            Err(Denied::Critical(_))
        ));
        assert!(
            b.check_publish("acme", &Topic::parse("deal.won").unwrap())
                .is_ok()
        );
    }

    #[test]
    fn allowlist_and_classes() {
        let b = PolicyBundle::from_yaml(BUNDLE).unwrap();
        assert!(b.check_subscribe("acme", &pat("deal.stage.*")).is_ok());
        assert_eq!(
            b.check_subscribe("acme", &pat("contact.*")),
            Err(Denied::NotAllowed("contact.*".into()))
        );
        assert!(matches!(
            b.check_subscribe("acme", &pat("payment.card.charged")),
            Err(Denied::Critical(_))
        ));
        // A broad subscription that would include critical topics is refused too.
        assert!(matches!(
            b.check_subscribe("acme", &pat(">")),
            Err(Denied::Critical(_))
        ));
        assert_eq!(
            b.check_subscribe("globex", &pat("deal.*")),
            Err(Denied::UnknownTenant)
        );
        let topic = Topic::parse("deal.stage.updated").unwrap();
        assert!(b.check_publish("acme", &topic).is_ok());
        let limits = b.limits("acme", &Limits::default()).unwrap();
        assert_eq!(limits.max_subscriptions_per_connection, 3);
        assert_eq!(limits.max_message_bytes, 1024 * 1024);
    }

    #[test]
    fn allow_all_allows_everything() {
        let b = PolicyBundle::allow_all();
        assert!(b.check_subscribe("anyone", &pat("*")).is_ok());
        assert!(b.check_subscribe("anyone", &pat("a.*.c")).is_ok());
    }

    #[test]
    fn bad_bundles_are_refused_with_reasons() {
        let err = PolicyBundle::from_yaml(
            "tenants:\n  acme:\n    subscribe:\n      - pattern: 'a.>.b'\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("a.>.b"), "{err}");
        let err = PolicyBundle::from_yaml("tenants:\n  'a b': {}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("a b"), "{err}");
        let err = PolicyBundle::from_yaml("tenant: {}\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("tenant"), "{err}");
        for empty in ["", " \n"] {
            let err = PolicyBundle::from_yaml(empty).unwrap_err().to_string();
            assert!(err.contains("is empty"), "{err}");
        }
        assert!(PolicyBundle::from_yaml("tenants: {}\n").is_ok());
    }
}
