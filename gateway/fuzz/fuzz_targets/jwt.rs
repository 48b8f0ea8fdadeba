//! A bearer token: verified by a verifier with a shared secret, as every
//! connection's token is.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use switchboard_config::AuthConfig;
use switchboard_gateway::auth::Verifier;

fn setup() -> &'static (tokio::runtime::Runtime, Verifier) {
    static SETUP: OnceLock<(tokio::runtime::Runtime, Verifier)> = OnceLock::new();
    SETUP.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let config = AuthConfig {
            hs256_secret: Some("fuzz-secret".into()),
            ..AuthConfig::default()
        };
        (rt, Verifier::new(&config).expect("verifier"))
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let (rt, verifier) = setup();
    let _ = rt.block_on(verifier.verify(token));
});
