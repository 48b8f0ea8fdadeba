//! An HTTP publish body: one event or a batch, parsed into the gateway's
//! publish requests and their topics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard_config::Topic;
use switchboard_gateway::node::PublishRequest;

fuzz_target!(|data: &[u8]| {
    let Ok(body) = serde_json::from_slice::<serde_json::Value>(data) else {
        return;
    };
    let events = match body.get("events") {
        Some(serde_json::Value::Array(items)) => items.clone(),
        _ => vec![body],
    };
    for e in events {
        if let Ok(req) = serde_json::from_value::<PublishRequest>(e) {
            let _ = Topic::parse(&req.event_type);
        }
    }
});
