//! Token verification: HS256 secrets, RS/ES public keys (PEM) and JWKS with
//! key rotation by `kid`.
//!
//! The algorithm in a token's header only selects among keys configured for
//! that algorithm family: an HS token is never checked against a public key
//! (the classic "algorithm confusion"), and `alg: none` does not parse.

use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, Validation};
use serde_json::{Map, Value};
use switchboard_config::AuthConfig;
use switchboard_config::policy::valid_tenant;
use tokio::sync::Mutex;

/// The secret used when no key is configured, so `cargo run` works out of
/// the box. The gateway logs a warning when it is in use.
pub const DEV_SECRET: &str = "switchboard-dev-secret-change-me";

/// Scope a token needs to publish.
pub const SCOPE_PUBLISH: &str = "publish";
/// Scope that lets a publisher name any tenant.
pub const SCOPE_PLATFORM: &str = "platform";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
/// Why a token was refused.
pub enum AuthError {
    #[error("missing token")]
    /// No token in the request.
    Missing,
    #[error("malformed token")]
    /// Not a JWT.
    Malformed,
    #[error("algorithm {0:?} is not accepted")]
    /// An algorithm this gateway does not accept (never `none`).
    Algorithm(String),
    #[error("no key for this token")]
    /// No configured key verifies it (unknown `kid`).
    NoKey,
    #[error("invalid token: {0}")]
    /// The signature or a claim check failed.
    Invalid(String),
    #[error("token has expired")]
    /// `exp` has passed.
    Expired,
    #[error("token has no usable tenant claim")]
    /// The tenant claim is missing or not a valid tenant.
    NoTenant,
    #[error("company_id does not match the token's tenant")]
    /// `company_id` (or a refreshed token) names another tenant or user.
    TenantMismatch,
    #[error("cannot load key: {0}")]
    /// The auth configuration cannot be used.
    Config(String),
}

/// Who a verified token speaks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The tenant the token belongs to.
    pub tenant: Arc<str>,
    /// The token's subject (shared with the connection's mailbox).
    pub user: Arc<str>,
    /// Scopes granted (`publish`, `platform`, the erase scope).
    pub scopes: Scopes,
    /// Unix seconds.
    pub expires_at: u64,
}

impl Principal {
    /// Whether the token grants `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.contains(scope)
    }
}

/// The scopes a token grants, kept as one space-separated string: every
/// open connection keeps its principal, and one small allocation costs
/// less than a list of strings (a `Vec<String>` of one scope took 112
/// bytes of heap per connection, this 16).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scopes(Box<str>);

impl Scopes {
    /// The scopes of an OAuth-style `scope` string (space-separated) and
    /// of a list of names. A listed name that is empty or holds whitespace
    /// names no scope the gateway checks, and is dropped.
    pub fn new<'a>(spaced: Option<&'a str>, listed: impl IntoIterator<Item = &'a str>) -> Self {
        let names: Vec<&str> = spaced
            .into_iter()
            .flat_map(str::split_whitespace)
            .chain(
                listed
                    .into_iter()
                    .filter(|n| !n.is_empty() && !n.contains(char::is_whitespace)),
            )
            .collect();
        Scopes(names.join(" ").into())
    }

    /// Whether `scope` is one of them.
    pub fn contains(&self, scope: &str) -> bool {
        self.iter().any(|s| s == scope)
    }

    /// Each scope.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.split(' ').filter(|s| !s.is_empty())
    }
}

struct StaticKey {
    kid: Option<String>,
    family: AlgorithmFamily,
    key: DecodingKey,
}

struct JwksCache {
    url: String,
    ttl: Duration,
    set: Option<(Instant, JwkSet)>,
    last_fetch: Option<Instant>,
}

/// Verifies tokens against the configured keys (HS256 secret, RS/ES public keys, JWKS).
pub struct Verifier {
    hs: Option<DecodingKey>,
    keys: Vec<StaticKey>,
    jwks: Option<Mutex<JwksCache>>,
    http: reqwest::Client,
    issuer: Option<String>,
    audiences: Vec<String>,
    tenant_claim: String,
    leeway: u64,
    /// True when the built-in development secret is in use.
    pub dev_secret: bool,
}

/// A JWKS is fetched again on an unknown `kid` at most this often.
const JWKS_MISS_REFETCH: Duration = Duration::from_secs(1);

impl Verifier {
    /// A verifier for `config`; fails on keys that cannot be read.
    pub fn new(config: &AuthConfig) -> Result<Self, AuthError> {
        let dev_secret = config.has_no_keys();
        let secret = match (&config.hs256_secret_file, &config.hs256_secret) {
            (Some(path), _) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| AuthError::Config(format!("{}: {e}", path.display())))?
                    .trim_end()
                    .to_owned(),
            ),
            (None, Some(s)) => Some(s.clone()),
            (None, None) if dev_secret => Some(DEV_SECRET.to_owned()),
            (None, None) => None,
        };
        // HMAC takes an empty key, and anyone can sign with it: a secret
        // that came out empty (an empty Secret key, `hs256_secret: ""`) is a
        // mistake, never a key.
        if secret.as_deref().is_some_and(|s| s.trim().is_empty()) {
            return Err(AuthError::Config(match &config.hs256_secret_file {
                Some(path) => format!(
                    "the HS256 secret file {} is empty (anyone could sign with an empty key)",
                    path.display()
                ),
                None => "the HS256 secret is empty (anyone could sign with an empty key)".into(),
            }));
        }
        let mut keys = Vec::new();
        for k in &config.public_keys {
            let pem = match (&k.pem, &k.file) {
                (Some(p), _) => p.clone().into_bytes(),
                (None, Some(f)) => std::fs::read(f)
                    .map_err(|e| AuthError::Config(format!("{}: {e}", f.display())))?,
                (None, None) => return Err(AuthError::Config("public key without pem".into())),
            };
            let (family, key) = if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                (AlgorithmFamily::Rsa, key)
            } else {
                let key = DecodingKey::from_ec_pem(&pem).map_err(|e| {
                    AuthError::Config(format!("public key is neither RSA nor EC PEM: {e}"))
                })?;
                (AlgorithmFamily::Ec, key)
            };
            keys.push(StaticKey {
                kid: k.kid.clone(),
                family,
                key,
            });
        }
        Ok(Self {
            hs: secret.map(|s| DecodingKey::from_secret(s.as_bytes())),
            keys,
            jwks: config.jwks_url.as_ref().map(|url| {
                Mutex::new(JwksCache {
                    url: url.clone(),
                    ttl: Duration::from_secs(config.jwks_cache()),
                    set: None,
                    last_fetch: None,
                })
            }),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .unwrap_or_default(),
            issuer: config.issuer.clone(),
            audiences: config.audiences.clone(),
            tenant_claim: config.tenant_claim().to_owned(),
            leeway: config.leeway(),
            dev_secret,
        })
    }

    /// Verify a token and extract its principal.
    pub async fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Malformed)?;
        let alg = header.alg;
        let family = match alg {
            Algorithm::HS256 => AlgorithmFamily::Hmac,
            Algorithm::RS256
            | Algorithm::RS384
            | Algorithm::RS512
            | Algorithm::PS256
            | Algorithm::PS384
            | Algorithm::PS512 => AlgorithmFamily::Rsa,
            Algorithm::ES256 | Algorithm::ES384 => AlgorithmFamily::Ec,
            other => return Err(AuthError::Algorithm(format!("{other:?}"))),
        };
        let mut validation = Validation::new(alg);
        validation.leeway = self.leeway;
        validation.validate_nbf = true;
        // A configured issuer or audience must be present, not just match
        // when present.
        let mut required = vec!["exp"];
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        if self.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&self.audiences);
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);

        let claims = match family {
            AlgorithmFamily::Hmac => {
                let key = self.hs.as_ref().ok_or(AuthError::NoKey)?;
                decode(token, key, &validation)?
            }
            _ => {
                let kid = header.kid.as_deref();
                let candidates: Vec<&StaticKey> = self
                    .keys
                    .iter()
                    .filter(|k| k.family == family && (kid.is_none() || k.kid.as_deref() == kid))
                    .collect();
                let mut last = AuthError::NoKey;
                let mut found = None;
                for k in candidates {
                    match decode(token, &k.key, &validation) {
                        Ok(c) => {
                            found = Some(c);
                            break;
                        }
                        Err(e) => last = e,
                    }
                }
                match (found, kid) {
                    (Some(c), _) => c,
                    (None, Some(kid)) if self.jwks.is_some() => {
                        let key = self.jwks_key(kid, family).await?;
                        decode(token, &key, &validation)?
                    }
                    (None, _) => return Err(last),
                }
            }
        };
        self.principal(claims)
    }

    async fn jwks_key(&self, kid: &str, family: AlgorithmFamily) -> Result<DecodingKey, AuthError> {
        let Some(cache) = &self.jwks else {
            return Err(AuthError::NoKey);
        };
        let mut cache = cache.lock().await;
        let fresh = cache
            .set
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < cache.ttl);
        let known = cache
            .set
            .as_ref()
            .is_some_and(|(_, set)| set.find(kid).is_some());
        let may_refetch = cache
            .last_fetch
            .is_none_or(|at| at.elapsed() >= JWKS_MISS_REFETCH);
        if (!fresh || !known) && may_refetch {
            cache.last_fetch = Some(Instant::now());
            match self.fetch_jwks(&cache.url).await {
                Ok(set) => cache.set = Some((Instant::now(), set)),
                Err(e) => tracing::warn!(error = %e, "JWKS fetch failed; keeping cached keys"),
            }
        }
        let jwk = cache
            .set
            .as_ref()
            .and_then(|(_, set)| set.find(kid))
            .ok_or(AuthError::NoKey)?;
        let key = DecodingKey::from_jwk(jwk).map_err(|e| AuthError::Invalid(e.to_string()))?;
        if key.family() != family {
            return Err(AuthError::NoKey);
        }
        Ok(key)
    }

    async fn fetch_jwks(&self, url: &str) -> Result<JwkSet, reqwest::Error> {
        self.http
            .get(url)
            .send()
            .await?
            .error_for_status()?
            .json()
            .await
    }

    fn principal(&self, claims: Map<String, Value>) -> Result<Principal, AuthError> {
        let as_string = |v: &Value| match v {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            _ => None,
        };
        let tenant = claims
            .get(&self.tenant_claim)
            .or_else(|| claims.get("company_id"))
            .and_then(as_string)
            .filter(|t| valid_tenant(t))
            .ok_or(AuthError::NoTenant)?;
        let user = claims
            .get("user_id")
            .or_else(|| claims.get("sub"))
            .and_then(as_string)
            .unwrap_or_default();
        let list = |claim: &str| match claims.get(claim) {
            Some(Value::Array(a)) => a.iter().filter_map(as_string).collect(),
            _ => Vec::new(),
        };
        let mut listed = list("scope");
        listed.extend(list("scopes"));
        let scopes = Scopes::new(
            claims.get("scope").and_then(Value::as_str),
            listed.iter().map(String::as_str),
        );
        // RFC 7519 NumericDate may be fractional: whole seconds, rounded
        // down (the token is not valid past that second either way).
        let expires_at = claims
            .get("exp")
            .and_then(|v| {
                v.as_u64().or_else(|| {
                    v.as_f64()
                        .filter(|f| f.is_finite() && *f >= 0.0)
                        .map(|f| f.floor() as u64)
                })
            })
            .ok_or(AuthError::Malformed)?;
        Ok(Principal {
            tenant: tenant.into(),
            user: user.into(),
            scopes,
            expires_at,
        })
    }
}

fn decode(
    token: &str,
    key: &DecodingKey,
    validation: &Validation,
) -> Result<Map<String, Value>, AuthError> {
    use jsonwebtoken::errors::ErrorKind;
    jsonwebtoken::decode::<Map<String, Value>>(token, key, validation)
        .map(|d| d.claims)
        .map_err(|e| match e.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            _ => AuthError::Invalid(e.to_string()),
        })
}

/// Mint a development token (the `token` subcommand and tests).
pub fn mint_hs256(
    secret: &str,
    tenant: &str,
    user: &str,
    scopes: &[String],
    ttl: Duration,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = jsonwebtoken::get_current_timestamp();
    let claims = serde_json::json!({
        "sub": user,
        "tenant": tenant,
        "scope": scopes.join(" "),
        "iat": now,
        "exp": now + ttl.as_secs(),
    });
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
}

/// Check an optional `company_id` parameter against the token's tenant.
pub fn check_company(principal: &Principal, company_id: Option<&str>) -> Result<(), AuthError> {
    match company_id {
        Some(c) if !c.is_empty() && c != &*principal.tenant => Err(AuthError::TenantMismatch),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::Scopes;

    #[test]
    fn scopes_come_from_a_spaced_string_and_lists_and_match_whole_names() {
        let s = Scopes::new(Some("  subscribe\tpublish "), ["erase", "platform"]);
        for granted in ["subscribe", "publish", "erase", "platform"] {
            assert!(s.contains(granted), "{granted}");
        }
        assert_eq!(s.iter().count(), 4);
        for refused in ["", "pub", "publish erase", "subscribe\tpublish"] {
            assert!(!s.contains(refused), "{refused:?}");
        }
        // A listed name with whitespace was never one checked scope: it
        // grants neither of its words.
        let odd = Scopes::new(None, ["publish platform", "", "ok"]);
        assert!(!odd.contains("publish") && !odd.contains("platform"));
        assert!(odd.contains("ok"));
        assert_eq!(Scopes::default().iter().count(), 0);
        assert!(!Scopes::default().contains(""));
    }
}
