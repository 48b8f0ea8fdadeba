//! Erasing a data subject: the steps in their crash-safe order (record,
//! block, erase, record the outcome, audit) and the loop that resumes
//! erasures a stopped gateway left running. The erase API
//! (`transport::erase`) and the brokers' `erase` do the rest.

use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;

use crate::auth::{Principal, SCOPE_PLATFORM};
use crate::broker::BrokerError;
use crate::data_protection::{
    self, AuditRecord, ErasureCounts, ErasureJob, ErasureState, now_ms, subject_key,
};
use crate::node::Node;

/// An erasure without a heartbeat for this long was abandoned by its
/// gateway; another takes it up.
pub const STALE_AFTER: Duration = Duration::from_secs(10);
/// How often a running erasure says it is alive, and how often gateways
/// look for abandoned ones.
const HEARTBEAT: Duration = Duration::from_secs(3);

/// What the erase API was asked.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EraseRequest {
    /// The data subject (a string or a number, as in `gdpr_context`).
    pub data_subject_id: Value,
    /// The tenant (platform tokens only; default: the token's).
    #[serde(default, alias = "company_id")]
    pub tenant: Option<Value>,
    /// Refuse publishes for the subject this many seconds (default: the
    /// gateway's `data_protection.block_seconds`; 0: do not block).
    #[serde(default)]
    pub block_seconds: Option<u64>,
    /// Only lift a block (erase nothing).
    #[serde(default)]
    pub lift_block: bool,
}

/// Why an erasure was refused.
#[derive(Debug, thiserror::Error)]
pub enum EraseError {
    /// The token has neither the erase scope nor `platform`.
    #[error("token lacks the '{0}' or 'platform' scope")]
    NotAllowed(String),
    /// Another tenant than the token's.
    #[error("only platform tokens may erase another tenant's data")]
    WrongTenant,
    /// A field with a wrong value.
    #[error("{0}")]
    Invalid(String),
    /// The bus could not take the record or the block.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

impl Node {
    /// Erase a data subject of a tenant (see docs/data-protection.md).
    pub async fn erase(
        self: &Arc<Self>,
        principal: &Principal,
        req: EraseRequest,
    ) -> Result<ErasureJob, EraseError> {
        let scope = &self.config.data_protection.erase_scope;
        let platform = principal.has_scope(SCOPE_PLATFORM);
        if !platform && !principal.has_scope(scope) {
            return Err(EraseError::NotAllowed(scope.clone()));
        }
        let tenant: Arc<str> = match &req.tenant {
            None | Some(Value::Null) => principal.tenant.clone(),
            Some(v) => {
                let named = match v {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    _ => return Err(EraseError::Invalid("tenant must be a string".into())),
                };
                if named != *principal.tenant && !platform {
                    return Err(EraseError::WrongTenant);
                }
                if !switchboard_config::policy::valid_tenant(&named) {
                    return Err(EraseError::Invalid(format!("invalid tenant {named:?}")));
                }
                named.into()
            }
        };
        let subject = data_protection::subject_text(&req.data_subject_id).ok_or_else(|| {
            EraseError::Invalid(format!(
                "data_subject_id must be a string (1-{} characters) or a number",
                data_protection::MAX_SUBJECT_LEN
            ))
        })?;
        let key = subject_key(&tenant, &subject);
        let now = now_ms();
        if req.lift_block {
            self.broker.block_subject(key.clone(), 0).await?;
            tracing::info!(target: "switchboard::audit", tenant = %tenant, by = %principal.user, "data subject block lifted");
            return Ok(ErasureJob {
                id: key,
                tenant: tenant.to_string(),
                data_subject_id: subject,
                requested_by: requester(principal),
                state: ErasureState::Completed,
                started_ms: now,
                heartbeat_ms: now,
                blocked_until_ms: None,
                resumed: 0,
                erased: ErasureCounts::default(),
            });
        }
        let block = req
            .block_seconds
            .unwrap_or(self.config.data_protection.block_seconds);
        let until = (block > 0).then(|| now.saturating_add((block as i64).saturating_mul(1000)));
        let job = ErasureJob {
            id: key.clone(),
            tenant: tenant.to_string(),
            data_subject_id: subject,
            requested_by: requester(principal),
            state: ErasureState::Running,
            started_ms: now,
            heartbeat_ms: now,
            blocked_until_ms: until,
            resumed: 0,
            erased: ErasureCounts::default(),
        };
        // The record first: a gateway dying from here on leaves a running
        // erasure that another takes up. The block next: nothing new for
        // the subject lands while its events are being erased.
        self.broker.record_erasure(&job).await?;
        if let Some(until) = until {
            self.broker.block_subject(key, until).await?;
        }
        Ok(self.run_erasure(job).await)
    }

    /// Erase, keeping the record's heartbeat fresh, then record the
    /// outcome and write the audit record.
    async fn run_erasure(self: &Arc<Self>, mut job: ErasureJob) -> ErasureJob {
        let heartbeat = {
            let node = self.clone();
            let mut beat = job.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(HEARTBEAT).await;
                    beat.heartbeat_ms = now_ms();
                    let _ = node.broker.record_erasure(&beat).await;
                }
            })
        };
        let tenant: Arc<str> = job.tenant.as_str().into();
        let pace = Duration::from_millis(self.config.data_protection.erase_pace_ms);
        let counts = match self.broker.erase(&tenant, &job.data_subject_id, pace).await {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "erasure failed");
                ErasureCounts {
                    unreachable: vec![self.region.to_string()],
                    ..ErasureCounts::default()
                }
            }
        };
        heartbeat.abort();
        job.erased.add(&counts);
        job.state = if counts.complete() {
            ErasureState::Completed
        } else {
            ErasureState::Partial
        };
        job.heartbeat_ms = now_ms();
        if let Err(e) = self.broker.record_erasure(&job).await {
            tracing::error!(error = %e, "cannot record the erasure's outcome");
        }
        let record = AuditRecord {
            action: "erasure".into(),
            erasure_id: job.id.clone(),
            at: crate::protocol::now_rfc3339(),
            tenant: job.tenant.clone(),
            data_subject_id: job.data_subject_id.clone(),
            requested_by: job.requested_by.clone(),
            gateway: format!(
                "{}/{}",
                self.region,
                std::env::var("HOSTNAME").unwrap_or_else(|_| std::process::id().to_string())
            ),
            outcome: job.state,
            resumed: job.resumed,
            erased: job.erased.clone(),
            blocked_until: job.blocked_until_ms.map(rfc3339_ms),
        };
        data_protection::audit(self.config.data_protection.audit_file.as_deref(), &record);
        job
    }

    /// Take up erasures other gateways left running, for as long as the
    /// process runs.
    pub async fn resume_erasures(self: Arc<Self>) {
        loop {
            tokio::time::sleep(HEARTBEAT).await;
            for job in self.broker.claim_stale_erasures(STALE_AFTER).await {
                tracing::warn!(erasure_id = %job.id, tenant = %job.tenant, "resuming an interrupted erasure");
                self.run_erasure(job).await;
            }
        }
    }
}

fn requester(p: &Principal) -> String {
    format!("{} (tenant {})", p.user, p.tenant)
}

fn rfc3339_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .map(crate::protocol::format_time)
        .unwrap_or_default()
}
