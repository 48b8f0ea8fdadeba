//! The gateway config file and the policy bundle, as an operator (or the
//! operator's ConfigMap) writes them: parsed, validated, and the policy
//! queried for the topics it names.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_config::{GatewayConfig, Pattern, PolicyBundle, Topic};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = GatewayConfig::from_yaml(text);
    if let Ok(policy) = PolicyBundle::from_yaml(text) {
        let _ = policy.validate();
        let _ = policy.digest();
        for tenant in policy.tenants.keys() {
            for pattern in policy.subscribable(tenant) {
                let _ = policy.check_subscribe(tenant, &pattern);
                if let Ok(topic) = Topic::parse(pattern.as_str()) {
                    let _ = policy.check_publish(tenant, &topic);
                    let _ = policy.is_presence(tenant, &topic);
                }
            }
            if let Ok(any) = Pattern::parse(">") {
                let _ = policy.check_subscribe(tenant, &any);
            }
        }
    }
});
