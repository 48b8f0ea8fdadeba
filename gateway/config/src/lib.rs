//! The file formats shared by the Switchboard gateway and operator.
//!
//! - [`gateway`]: the gateway's configuration file (`switchboard.yaml`).
//! - [`policy`]: the tenant policy bundle the gateway hot-reloads.
//! - [`readiness`]: the gateway's `/readyz` answer (the operator reads it).
//! - [`topic`]: validated topic names and subscription patterns.
//!
//! The operator renders these types into a ConfigMap; the gateway reads them
//! back. Defining them once here is what keeps the two sides in agreement.

pub mod gateway;
pub mod policy;
pub mod readiness;
pub mod topic;

pub use gateway::{
    AuthConfig, ConsoleConfig, ConsoleMode, DEFAULT_ADMIN_LISTEN, DataProtectionConfig,
    GatewayConfig, HeartbeatConfig, HistoryConfig, Limits, LogFormat, NatsConfig, NatsTls,
    OtlpProtocol, OverloadConfig, PresenceConfig, REGION_RULE, TelemetryConfig, valid_region,
};
pub use policy::{InteractionClass, PatternRule, PolicyBundle, TenantLimits, TenantPolicy};
pub use readiness::{Readiness, ReadyState};
pub use topic::{Pattern, Topic, TopicError};

/// A config or policy file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The text is not the YAML (or JSON) expected.
    #[error("cannot parse {what}: {message}")]
    Parse {
        /// Which file.
        what: &'static str,
        /// What the parser said.
        message: String,
    },
    /// It parsed but breaks a rule.
    #[error("invalid {what}: {}", problems.join("; "))]
    Invalid {
        /// Which file.
        what: &'static str,
        /// Every rule broken, for people.
        problems: Vec<String>,
    },
}

pub(crate) fn parse_yaml<T: serde::de::DeserializeOwned>(
    what: &'static str,
    text: &str,
) -> Result<T, FormatError> {
    if text.trim().is_empty() {
        return serde_json::from_str("{}").map_err(|e| FormatError::Parse {
            what,
            message: e.to_string(),
        });
    }
    serde_saphyr::from_str(text).map_err(|e| FormatError::Parse {
        what,
        message: e.to_string(),
    })
}
