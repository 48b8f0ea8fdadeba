//! Token verification: HS256, RS256/ES256 PEM keys, JWKS with rotation,
//! time claims, issuer/audience, and the classic attacks.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use serde_json::{Value, json};
use switchboard_gateway::auth::{AuthError, Verifier};
use switchboard_gateway::config::AuthConfig;
use switchboard_gateway::config::gateway::PublicKeyConfig;

const FIX: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!("{FIX}/{name}")).unwrap()
}

fn claims(extra: Value) -> Value {
    let mut c = json!({"tenant": "acme", "sub": "u1", "exp": get_current_timestamp() + 600});
    if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            c.insert(k.clone(), v.clone());
        }
    }
    c
}

fn rs(key: &str, kid: Option<&str>, c: &Value) -> String {
    let mut h = Header::new(Algorithm::RS256);
    h.kid = kid.map(Into::into);
    encode(&h, c, &EncodingKey::from_rsa_pem(&fixture(key)).unwrap()).unwrap()
}

fn es(c: &Value) -> String {
    encode(
        &Header::new(Algorithm::ES256),
        c,
        &EncodingKey::from_ec_pem(&fixture("ec1.key")).unwrap(),
    )
    .unwrap()
}

fn hs(secret: &[u8], c: &Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        c,
        &EncodingKey::from_secret(secret),
    )
    .unwrap()
}

fn pem_config() -> AuthConfig {
    AuthConfig {
        public_keys: vec![
            PublicKeyConfig {
                kid: None,
                pem: None,
                file: Some(format!("{FIX}/rsa1.pub").into()),
            },
            PublicKeyConfig {
                kid: None,
                pem: Some(String::from_utf8(fixture("ec1.pub")).unwrap()),
                file: None,
            },
        ],
        ..AuthConfig::default()
    }
}

#[tokio::test]
async fn hs256_and_claims() {
    let v = Verifier::new(&AuthConfig {
        hs256_secret: Some("s3cret".into()),
        ..AuthConfig::default()
    })
    .unwrap();
    assert!(!v.dev_secret);
    let p = v
        .verify(&hs(
            b"s3cret",
            &claims(json!({"scope": "publish subscribe"})),
        ))
        .await
        .unwrap();
    assert_eq!(&*p.tenant, "acme");
    assert_eq!(&*p.user, "u1");
    assert!(p.has_scope("publish"));
    assert!(matches!(
        v.verify(&hs(b"wrong", &claims(json!({})))).await,
        Err(AuthError::Invalid(_))
    ));
    assert_eq!(v.verify("").await, Err(AuthError::Missing));
    assert_eq!(v.verify("a.b").await, Err(AuthError::Malformed));
    // Tenant names outside the safe alphabet are refused, as is no tenant.
    assert_eq!(
        v.verify(&hs(b"s3cret", &claims(json!({"tenant": "a b"}))))
            .await,
        Err(AuthError::NoTenant)
    );
    assert_eq!(
        v.verify(&hs(b"s3cret", &claims(json!({"tenant": null}))))
            .await,
        Err(AuthError::NoTenant)
    );
    // A custom tenant claim.
    let v = Verifier::new(&AuthConfig {
        hs256_secret: Some("s3cret".into()),
        tenant_claim: Some("org".into()),
        ..AuthConfig::default()
    })
    .unwrap();
    let p = v
        .verify(&hs(b"s3cret", &claims(json!({"org": "initech"}))))
        .await
        .unwrap();
    assert_eq!(&*p.tenant, "initech");
}

#[tokio::test]
async fn exp_and_nbf_with_leeway() {
    let v = Verifier::new(&AuthConfig {
        hs256_secret: Some("k".into()),
        leeway_seconds: Some(5),
        ..AuthConfig::default()
    })
    .unwrap();
    let now = get_current_timestamp();
    assert!(
        v.verify(&hs(b"k", &claims(json!({"exp": now - 2}))))
            .await
            .is_ok(),
        "within leeway"
    );
    assert_eq!(
        v.verify(&hs(b"k", &claims(json!({"exp": now - 60})))).await,
        Err(AuthError::Expired)
    );
    assert!(
        v.verify(&hs(b"k", &claims(json!({"nbf": now + 60}))))
            .await
            .is_err()
    );
    assert!(
        v.verify(&hs(b"k", &claims(json!({"nbf": now + 2}))))
            .await
            .is_ok()
    );
    let mut no_exp = claims(json!({}));
    no_exp.as_object_mut().unwrap().remove("exp");
    assert!(
        v.verify(&hs(b"k", &no_exp)).await.is_err(),
        "exp is required"
    );
}

#[tokio::test]
async fn issuer_and_audience_when_configured() {
    let v = Verifier::new(&AuthConfig {
        hs256_secret: Some("k".into()),
        issuer: Some("https://id.example".into()),
        audiences: vec!["switchboard".into()],
        ..AuthConfig::default()
    })
    .unwrap();
    let good = claims(json!({"iss": "https://id.example", "aud": "switchboard"}));
    assert!(v.verify(&hs(b"k", &good)).await.is_ok());
    assert!(
        v.verify(&hs(
            b"k",
            &claims(json!({"iss": "https://evil", "aud": "switchboard"}))
        ))
        .await
        .is_err()
    );
    assert!(
        v.verify(&hs(
            b"k",
            &claims(json!({"iss": "https://id.example", "aud": "other"}))
        ))
        .await
        .is_err()
    );
    assert!(
        v.verify(&hs(b"k", &claims(json!({"aud": "switchboard"}))))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn rs256_and_es256_from_pem() {
    let v = Verifier::new(&pem_config()).unwrap();
    assert_eq!(
        &*v.verify(&rs("rsa1.key", None, &claims(json!({}))))
            .await
            .unwrap()
            .tenant,
        "acme"
    );
    assert_eq!(
        &*v.verify(&es(&claims(json!({})))).await.unwrap().tenant,
        "acme"
    );
    // Signed by a key that is not configured.
    assert!(
        v.verify(&rs("rsa2.key", None, &claims(json!({}))))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn alg_none_and_algorithm_confusion_are_rejected() {
    use base64::Engine;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&claims(json!({})))
    );
    let v = Verifier::new(&pem_config()).unwrap();
    assert!(v.verify(&none).await.is_err());
    // HS256 signed with the RSA *public* key as the secret.
    let confused = hs(&fixture("rsa1.pub"), &claims(json!({})));
    assert_eq!(v.verify(&confused).await, Err(AuthError::NoKey));
    // Even when an HS secret is configured beside the public keys.
    let mut both = pem_config();
    both.hs256_secret = Some("real-secret".into());
    let v = Verifier::new(&both).unwrap();
    assert!(v.verify(&confused).await.is_err());
    assert!(v.verify(&none).await.is_err());
    // A token whose header claims RS256 but carries an HMAC signature.
    let hmac_sig = confused.rsplit('.').next().unwrap();
    let forged = format!(
        "{}.{}.{hmac_sig}",
        b64(&json!({"alg": "RS256"})),
        b64(&claims(json!({})))
    );
    assert!(v.verify(&forged).await.is_err());
}

/// A JWKS endpoint whose key set the test can rotate.
async fn jwks_server(set: Arc<Mutex<JwkSet>>, hits: Arc<Mutex<u32>>) -> String {
    let app = axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let set = set.clone();
            let hits = hits.clone();
            async move {
                *hits.lock().unwrap() += 1;
                axum::Json(set.lock().unwrap().clone())
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/jwks.json")
}

fn jwk(key: &str, kid: &str) -> Jwk {
    let mut j = Jwk::from_encoding_key(
        &EncodingKey::from_rsa_pem(&fixture(key)).unwrap(),
        Algorithm::RS256,
    )
    .unwrap();
    j.common.key_id = Some(kid.into());
    j
}

#[tokio::test]
async fn jwks_is_cached_and_rotates_by_kid() {
    let set = Arc::new(Mutex::new(JwkSet {
        keys: vec![jwk("rsa1.key", "k1")],
    }));
    let hits = Arc::new(Mutex::new(0));
    let url = jwks_server(set.clone(), hits.clone()).await;
    let v = Verifier::new(&AuthConfig {
        jwks_url: Some(url),
        ..AuthConfig::default()
    })
    .unwrap();
    assert!(!v.dev_secret);
    let c = claims(json!({}));
    assert!(v.verify(&rs("rsa1.key", Some("k1"), &c)).await.is_ok());
    assert!(v.verify(&rs("rsa1.key", Some("k1"), &c)).await.is_ok());
    assert_eq!(
        *hits.lock().unwrap(),
        1,
        "second verification uses the cache"
    );
    // A kid signed with the wrong key fails even though the kid is known.
    assert!(v.verify(&rs("rsa2.key", Some("k1"), &c)).await.is_err());

    // Rotation: the issuer publishes k2 and retires k1.
    *set.lock().unwrap() = JwkSet {
        keys: vec![jwk("rsa2.key", "k2")],
    };
    tokio::time::sleep(Duration::from_millis(1100)).await; // the refetch-on-miss rate limit
    assert!(
        v.verify(&rs("rsa2.key", Some("k2"), &c)).await.is_ok(),
        "unknown kid triggers a refetch"
    );
    assert_eq!(*hits.lock().unwrap(), 2);
    // Unknown kids do not hammer the JWKS endpoint.
    for _ in 0..5 {
        assert!(v.verify(&rs("rsa2.key", Some("nope"), &c)).await.is_err());
    }
    assert!(*hits.lock().unwrap() <= 3);
}

/// RFC 7519 allows a fractional NumericDate: such an `exp` must give the
/// session its real expiry (whole seconds), not 0 (closed at once).
#[tokio::test]
async fn a_fractional_exp_is_honoured() {
    let v = Verifier::new(&AuthConfig {
        hs256_secret: Some("k".into()),
        ..AuthConfig::default()
    })
    .unwrap();
    let now = get_current_timestamp();
    let exp = now as f64 + 120.75;
    let p = v
        .verify(&hs(b"k", &claims(json!({"exp": exp}))))
        .await
        .unwrap();
    assert_eq!(p.expires_at, now + 120);

    // Over a WebSocket, the session stays open and reports the expiry.
    use common::{Client, Gateway, ids, publish_ok, sign};
    let gw = Gateway::default().await;
    let token = sign(&json!({"tenant": "acme", "user_id": "u", "exp": exp}));
    let mut c = Client::connect(&gw.ws(&format!("token={token}"))).await;
    let hello = c.recv_type("connection.established").await;
    assert_eq!(hello["data"]["expires_at"], now + 120);
    assert_eq!(
        c.subscribe(&["deal.*"]).await["type"],
        "subscription.confirmed"
    );
    let id = publish_ok(&gw, "acme", "deal.won", json!({})).await;
    assert_eq!(ids(&c.events(1).await), [id], "still open and delivering");
}

/// HMAC accepts an empty key, so a secret that came out empty (an empty
/// Secret mounted as the file, `hs256_secret: ""`) would let anyone sign
/// tokens for any tenant. It is refused at start-up instead.
#[tokio::test]
async fn an_empty_hs256_secret_is_refused_not_used() {
    let dir = std::env::temp_dir().join(format!("switchboard-empty-secret-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("hs256");
    std::fs::write(&file, "\n").unwrap();
    let configs = [
        AuthConfig {
            hs256_secret_file: Some(file.clone()),
            ..AuthConfig::default()
        },
        AuthConfig {
            hs256_secret: Some(String::new()),
            ..AuthConfig::default()
        },
        AuthConfig {
            hs256_secret: Some("  ".into()),
            ..AuthConfig::default()
        },
    ];
    for config in configs {
        match Verifier::new(&config) {
            Err(AuthError::Config(why)) => assert!(why.contains("empty"), "{why}"),
            Err(e) => panic!("{config:?}: refused for another reason: {e}"),
            Ok(v) => {
                let forged = v.verify(&hs(b"", &claims(json!({})))).await;
                panic!("{config:?}: accepted; a token signed with an empty key gives {forged:?}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
