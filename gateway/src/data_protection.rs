//! Data protection rules shared by both brokers: reading an event's
//! `gdpr_context` (data subject, retention), how long an event stays
//! replayable, which subjects are blocked after an erasure, and the audit
//! trail of erasures. See docs/data-protection.md.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::time::Duration;

use dashmap::DashMap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Longest data subject id accepted.
pub const MAX_SUBJECT_LEN: usize = 256;

/// What an event's `gdpr_context` says, once checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GdprContext {
    /// `data_subject_id`, as text (seed 001 sends strings or numbers).
    pub data_subject: Option<String>,
    /// `retention_days`.
    pub retention_days: Option<u64>,
}

/// A `gdpr_context` that cannot be honoured as given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GdprError {
    /// Not an object.
    #[error("gdpr_context must be an object")]
    NotObject,
    /// `data_subject_id` of the wrong type or size.
    #[error(
        "gdpr_context.data_subject_id must be a string (1-{MAX_SUBJECT_LEN} characters) or a number"
    )]
    Subject,
    /// `retention_days` that is not a whole number of days, at least 1.
    #[error("gdpr_context.retention_days must be a whole number of days, at least 1")]
    Retention,
}

/// The data subject id a JSON value names (a string or a number).
pub fn subject_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) if !s.is_empty() && s.len() <= MAX_SUBJECT_LEN => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl GdprContext {
    /// Check a publish's `gdpr_context` (absent or `null`: nothing to honour).
    pub fn parse(v: Option<&Value>) -> Result<Self, GdprError> {
        let obj = match v {
            None | Some(Value::Null) => return Ok(Self::default()),
            Some(Value::Object(o)) => o,
            Some(_) => return Err(GdprError::NotObject),
        };
        let data_subject = match obj.get("data_subject_id") {
            None | Some(Value::Null) => None,
            Some(v) => Some(subject_text(v).ok_or(GdprError::Subject)?),
        };
        let retention_days = match obj.get("retention_days") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => match n.as_u64() {
                Some(d) if d >= 1 => Some(d),
                _ => return Err(GdprError::Retention),
            },
            Some(_) => return Err(GdprError::Retention),
        };
        Ok(Self {
            data_subject,
            retention_days,
        })
    }

    /// The data subject of a stored event's context (no checks: what was
    /// stored passed them, or came straight from a backend on NATS).
    pub fn subject_of(v: Option<&Value>) -> Option<String> {
        v.and_then(|c| c.get("data_subject_id"))
            .and_then(subject_text)
    }
}

/// How long an event stays replayable: the shortest of its own
/// `retention_days`, the tenant's `max_retention_days`, the tenant's
/// history retention and the gateway's.
pub fn retention(
    event_days: Option<u64>,
    tenant_max_days: Option<u32>,
    tenant_seconds: Option<u64>,
    gateway_seconds: u64,
    day_seconds: u64,
) -> Duration {
    let days = |d: u64| d.saturating_mul(day_seconds);
    let seconds = [
        event_days.map(days),
        tenant_max_days.map(|d| days(u64::from(d))),
        tenant_seconds,
        Some(gateway_seconds),
    ]
    .into_iter()
    .flatten()
    .min()
    .unwrap_or(gateway_seconds);
    Duration::from_secs(seconds)
}

/// A data subject as stored in block lists and job records: a SHA-256 of
/// the tenant and the id, so the lists do not hold the id itself.
pub fn subject_key(tenant: &str, subject: &str) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(tenant.as_bytes());
    h.update([0]);
    h.update(subject.as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Subjects whose publishes are refused, by [`subject_key`], with the Unix
/// time (ms) until which they are (`i64::MAX`: until lifted).
#[derive(Default)]
pub struct Blocklist {
    until: DashMap<String, i64>,
}

impl Blocklist {
    /// Block (or with `until_ms` in the past, lift) a subject key.
    pub fn set(&self, key: String, until_ms: i64) {
        if until_ms <= now_ms() {
            self.until.remove(&key);
        } else {
            self.until.insert(key, until_ms);
        }
    }

    /// Whether publishes for this subject key are refused now.
    pub fn blocked(&self, key: &str) -> bool {
        self.until.get(key).is_some_and(|u| *u > now_ms())
    }
}

/// Unix time in milliseconds.
pub fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

/// What one erasure removed.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErasureCounts {
    /// Events removed from each region's history.
    pub regions: BTreeMap<String, u64>,
    /// Idempotency records forgotten (embedded mode; JetStream keeps only
    /// a hash of the key, see docs/data-protection.md).
    pub dedup_records: u64,
    /// Regions whose history could not be reached: the erasure is partial
    /// and must be asked again.
    pub unreachable: Vec<String>,
}

impl ErasureCounts {
    /// Whether every region was reached.
    pub fn complete(&self) -> bool {
        self.unreachable.is_empty()
    }

    /// Add what another pass removed.
    pub fn add(&mut self, other: &ErasureCounts) {
        for (r, n) in &other.regions {
            *self.regions.entry(r.clone()).or_default() += n;
        }
        self.dedup_records += other.dedup_records;
        self.unreachable = other.unreachable.clone();
    }
}

/// Where an erasure stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErasureState {
    /// Under way (or interrupted: a gateway that finds it stale resumes it).
    Running,
    /// Every region was reached.
    Completed,
    /// Some region could not be reached: ask again.
    Partial,
}

/// The record of one erasure (one per tenant and data subject; asking
/// again updates it). In cluster mode it is kept in the erasure bucket, so
/// that another gateway resumes an erasure whose gateway died.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErasureJob {
    /// [`subject_key`] of the tenant and subject.
    pub id: String,
    /// The tenant.
    pub tenant: String,
    /// The data subject id.
    pub data_subject_id: String,
    /// Who asked (token subject and tenant).
    pub requested_by: String,
    /// Where it stands.
    pub state: ErasureState,
    /// Unix ms it was (last) asked for.
    pub started_ms: i64,
    /// Unix ms a gateway last worked on it.
    pub heartbeat_ms: i64,
    /// Until when publishes for the subject are refused (Unix ms).
    pub blocked_until_ms: Option<i64>,
    /// Times a gateway took it up after another stopped.
    pub resumed: u32,
    /// What was erased so far.
    pub erased: ErasureCounts,
}

/// One line of the audit trail: who erased which subject of which tenant,
/// when, and how much; never the erased data.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditRecord {
    /// `erasure`.
    pub action: String,
    /// The erasure's id.
    pub erasure_id: String,
    /// RFC 3339 time the record was written.
    pub at: String,
    /// The tenant.
    pub tenant: String,
    /// The data subject id erased.
    pub data_subject_id: String,
    /// The caller (the token's `sub`) and its tenant.
    pub requested_by: String,
    /// The gateway process that did it.
    pub gateway: String,
    /// `completed` or `partial`.
    pub outcome: ErasureState,
    /// Times the erasure was taken up again after a gateway stopped.
    pub resumed: u32,
    /// What was removed.
    pub erased: ErasureCounts,
    /// Until when (RFC 3339) publishes for the subject are refused, if they are.
    pub blocked_until: Option<String>,
}

/// Write the audit record to the log and, when configured, append it to
/// the audit file (one JSON line).
pub fn audit(file: Option<&Path>, record: &AuditRecord) {
    let line = serde_json::to_string(record).unwrap_or_default();
    tracing::info!(target: "switchboard::audit", record = %line, "data subject erased");
    if let Some(path) = file {
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| {
                f.write_all(format!("{line}\n").as_bytes())?;
                f.sync_data()
            });
        if let Err(e) = written {
            tracing::error!(path = %path.display(), error = %e, "cannot write the audit record");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn contexts_are_checked() {
        let ok = GdprContext::parse(Some(&json!({
            "consent": true, "purpose": "x", "retention_days": 30, "data_subject_id": "u-1"
        })))
        .unwrap();
        assert_eq!(ok.data_subject.as_deref(), Some("u-1"));
        assert_eq!(ok.retention_days, Some(30));
        let n = GdprContext::parse(Some(&json!({"data_subject_id": 42}))).unwrap();
        assert_eq!(n.data_subject.as_deref(), Some("42"));
        assert_eq!(GdprContext::parse(None), Ok(GdprContext::default()));
        for (bad, want) in [
            (json!("x"), GdprError::NotObject),
            (json!({"data_subject_id": true}), GdprError::Subject),
            (json!({"data_subject_id": ""}), GdprError::Subject),
            (
                json!({"data_subject_id": "x".repeat(300)}),
                GdprError::Subject,
            ),
            (json!({"retention_days": 0}), GdprError::Retention),
            (json!({"retention_days": 1.5}), GdprError::Retention),
            (json!({"retention_days": -1}), GdprError::Retention),
            (json!({"retention_days": "7"}), GdprError::Retention),
        ] {
            assert_eq!(GdprContext::parse(Some(&bad)), Err(want), "{bad}");
        }
    }

    #[test]
    fn retention_is_the_shortest_bound() {
        let d = 86400;
        assert_eq!(
            retention(None, None, None, 3600, d),
            Duration::from_secs(3600)
        );
        assert_eq!(
            retention(Some(1), None, None, 10 * d, d),
            Duration::from_secs(d)
        );
        assert_eq!(
            retention(Some(30), Some(7), None, 100 * d, d),
            Duration::from_secs(7 * d)
        );
        assert_eq!(
            retention(Some(30), Some(7), Some(60), 100 * d, d),
            Duration::from_secs(60)
        );
        // A test "day" of two seconds.
        assert_eq!(
            retention(Some(3), None, None, 3600, 2),
            Duration::from_secs(6)
        );
        assert_eq!(
            retention(Some(u64::MAX), None, None, 3600, d),
            Duration::from_secs(3600)
        );
    }

    #[test]
    fn subject_keys_separate_tenants_and_hide_the_id() {
        let a = subject_key("acme", "u-1");
        assert_ne!(a, subject_key("other", "u-1"));
        assert_ne!(subject_key("a", "bc"), subject_key("ab", "c"));
        assert!(!a.contains("u-1"));
        let list = Blocklist::default();
        list.set(a.clone(), now_ms() + 60_000);
        assert!(list.blocked(&a));
        assert!(!list.blocked(&subject_key("other", "u-1")));
        list.set(a.clone(), 0);
        assert!(!list.blocked(&a));
    }
}
